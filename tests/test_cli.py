"""The README's one-prompt command: `jaxpaged generate`, on the built-in default model."""

import os
import pathlib
import subprocess
import sys

BIN = pathlib.Path(sys.executable).parent


def run_cli(*args, cache):
    env = {**os.environ, "JAXPAGED_CACHE": str(cache)}
    return subprocess.run([str(BIN / "jaxpaged"), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_generate_on_the_default_model_answers(smollm2_cache):
    result = run_cli("generate", "The capital of France is", "--max-tokens", "3",
                     cache=smollm2_cache)  # the session's converted default model
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is Paris")


def test_generate_is_deterministic_when_greedy(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("llama3-rope"))
    first = run_cli("generate", "Once upon a time", "--max-tokens", "12", "--model", model,
                    cache=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Once upon a time")
    assert len(first.stdout.strip()) > len("Once upon a time")
    again = run_cli("generate", "Once upon a time", "--max-tokens", "12", "--model", model,
                    cache=tmp_path)
    assert again.stdout == first.stdout


def test_generate_rejects_bad_arguments_with_a_clear_message(tmp_path):
    result = run_cli("generate", "Hi", "--temperature", "-1", cache=tmp_path)
    assert result.returncode == 2 and "temperature" in result.stderr
    result = run_cli("generate", "Hi", "--model", str(tmp_path / "missing"), cache=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr
