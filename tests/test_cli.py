"""The README's main command: `jaxpaged generate` on the built-in default model."""

import os
import pathlib
import subprocess
import sys

BIN = pathlib.Path(sys.executable).parent


def run_cli(*args, cache):
    env = {**os.environ, "JAXPAGED_CACHE": str(cache)}
    return subprocess.run([str(BIN / "jaxpaged"), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_generate_on_the_default_model_is_deterministic_when_greedy(tmp_path):
    first = run_cli("generate", "Once upon a time", "--max-tokens", "12", cache=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Once upon a time")
    assert len(first.stdout.strip()) > len("Once upon a time")
    assert any(tmp_path.iterdir()), "the default model is built into the cache on first use"
    again = run_cli("generate", "Once upon a time", "--max-tokens", "12", cache=tmp_path)
    assert again.stdout == first.stdout


def test_generate_rejects_bad_arguments_with_a_clear_message(tmp_path):
    result = run_cli("generate", "Hi", "--temperature", "-1", cache=tmp_path)
    assert result.returncode == 2 and "temperature" in result.stderr
    result = run_cli("generate", "Hi", "--model", str(tmp_path / "missing"), cache=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr
