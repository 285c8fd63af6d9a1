"""vLLM launch lines: `jaxpaged serve MODEL` or `--model`, the flags LLM() takes, vLLM's usual
flags parsed as no-ops or refused naming the value, `--config FILE.yaml`, chat templates from a
file, several API keys, and hub ids resolved from the local Hugging Face cache."""

import argparse
import dataclasses
import logging
import os
import subprocess
import sys

import pytest

from jaxpaged.config import _NO_OP_VLLM_ARGS, EngineConfig
from jaxpaged.server.args import (add_server_arguments, engine_config_from_args,
                                  server_settings_from_args)
from jaxpaged.server.chat_template import load_chat_template
from jaxpaged.server.config_file import apply_config_file

LAUNCH_LINE = ["-tp", "1", "--enforce-eager", "--trust-remote-code", "--disable-log-requests",
               "--uvicorn-log-level", "warning", "--kv-cache-dtype", "auto"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxpaged serve")
    add_server_arguments(parser)
    apply_config_file(parser, argv)
    return parser.parse_args(argv)


def engine(argv: list[str]) -> EngineConfig:
    return engine_config_from_args(parse(argv), "/models/x")


def test_model_positional_or_flag():
    assert parse(["/m/a"]).model_tag == "/m/a"
    assert parse(["--model", "/m/b"]).model == "/m/b"
    args = parse(["/m/a", "--model", "/m/b"])  # vLLM: the positional wins
    settings = server_settings_from_args(args, "/m/a")
    assert settings.served_model_names == ("/m/a",)


def test_the_issue_launch_line_parses_into_an_engine_config():
    args = parse(["org/model", *LAUNCH_LINE])
    config = engine_config_from_args(args, "/models/x")
    assert config.tensor_parallel_size == 1 and config.kv_cache_dtype == "auto"
    assert args.uvicorn_log_level == "warning" and args.disable_log_requests


def test_every_llm_argument_has_a_flag():
    args = parse([])
    names = [f.name for f in dataclasses.fields(EngineConfig) if f.name != "model"]
    missing = [n for n in [*names, *_NO_OP_VLLM_ARGS] if not hasattr(args, n)]
    assert not missing


@pytest.mark.parametrize("argv,value", [
    (["-tp", "0"], "tensor_parallel_size must be a positive integer, got 0"),
    (["-pp", "2"], "pipeline_parallel_size=2 .*not built"), (["--kv-cache-dtype", "fp8_inc"], "fp8_inc"),
    (["-q", "awq"], "awq"), (["--revision", "v2"], "v2"), (["--task", "embed"], "embed"),
    (["--hf-token", "hf_x"], "hf_token=<redacted>"),
])
def test_vllm_flags_asking_for_what_jaxpaged_lacks_are_refused_naming_the_value(argv, value):
    with pytest.raises(ValueError, match=value):
        engine(argv)


def test_tensor_parallel_size_flags():
    assert engine(["-tp", "2"]).tensor_parallel_size == 2
    assert engine(["--tensor-parallel-size", "4"]).tensor_parallel_size == 4


def test_quantization_none_and_no_op_flags_are_accepted():
    config = engine(["-q", "none", "--disable-log-stats", "--swap-space", "4", "-pp", "1",
                     "-dp", "1", "--max-log-len", "100"])
    assert config.dtype == "auto"


def test_dtype_half_runs_as_bfloat16_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="jaxpaged"):
        assert engine(["--dtype", "half"]).dtype == "bfloat16"
    assert "runs as bfloat16" in caplog.text


def test_llm_arguments_refuse_and_accept_as_the_flags_do():
    with pytest.raises(ValueError, match="'fp8_inc'"):
        EngineConfig.from_kwargs("/m", {"kv_cache_dtype": "fp8_inc"})
    assert engine(["--kv-cache-dtype", "fp8", "--calculate-kv-scales"]).calculate_kv_scales
    config = EngineConfig.from_kwargs("/m", {"pipeline_parallel_size": 1,
                                             "data_parallel_size": 1})
    assert config.model == "/m"


def test_generation_config_flags():
    config = engine(["--generation-config", "vllm",
                     "--override-generation-config", '{"temperature": 0.5}'])
    assert config.generation_config == "vllm"
    assert config.override_generation_config == {"temperature": 0.5}
    with pytest.raises(SystemExit):
        parse(["--override-generation-config", "[1]"])


def test_config_file_gives_defaults_the_command_line_overrides(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: /m/from-yaml\nmax-model-len: 512\nmax_num_seqs: 4\n"
                    "enable-prefix-caching: false\nenforce-eager: true\n"
                    "served-model-name: [a, b]\napi-key: k1\n"
                    "override-generation-config: {top_k: 1}\n")
    args = parse(["--config", str(path), "--max-model-len", "256"])
    assert args.model == "/m/from-yaml" and args.max_model_len == 256 and args.max_num_seqs == 4
    assert args.enable_prefix_caching is False and args.enforce_eager is True
    assert args.served_model_name == ["a", "b"] and args.api_key == ["k1"]
    assert args.override_generation_config == {"top_k": 1}
    assert parse([f"--config={path}", "/m/cli"]).model_tag == "/m/cli"


@pytest.mark.parametrize("text,named", [("max-modl-len: 5\n", "max-modl-len"),
                                        ("max-model-len: many\n", "max-model-len"),
                                        ("dtype: int4\n", "dtype"),
                                        ("enforce-eager: 3\n", "enforce-eager")])
def test_config_file_errors_name_the_key(tmp_path, capsys, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse(["--config", str(path)])
    assert named in capsys.readouterr().err


def test_several_api_keys(monkeypatch):
    args = parse(["--api-key", "k1", "k2"])
    assert server_settings_from_args(args, "/m").api_keys == ("k1", "k2")
    monkeypatch.setenv("JAXPAGED_API_KEY", "env-key")
    assert server_settings_from_args(parse([]), "/m").api_keys == ("env-key",)


def test_chat_template_from_a_file_or_the_text(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert load_chat_template(str(path)) == "{{ messages }}"
    assert load_chat_template("{% for m in messages %}{{ m.content }}\\n{% endfor %}") == \
        "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def make_hub_cache(root, repo_id, files):
    """A Hugging Face cache laid out by hand: models--org--name/{refs/main, snapshots/<rev>/}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    for f in files:
        (snapshot / f.name).symlink_to(f)
    return snapshot


def _resolve(model, cache):
    code = ("import sys; from jaxpaged.utils.hub import resolve_model\n"
            "try: print(resolve_model(sys.argv[1]))\n"
            "except ValueError as e: print('ERROR', e); sys.exit(3)")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True,
                          env=env, timeout=120)


def test_hub_id_resolves_from_the_local_cache(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    snapshot = make_hub_cache(tmp_path / "hub", "meta-llama/Llama-3.1-8B-Instruct",
                              [tmp_path / "config.json"])
    result = _resolve("meta-llama/Llama-3.1-8B-Instruct", tmp_path / "hub")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot)


def test_a_model_neither_a_directory_nor_cached_is_a_one_line_error(tmp_path):
    result = _resolve("org/not-there", tmp_path / "hub")
    assert result.returncode == 3
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "neither a directory nor in the Hugging Face cache" in lines[0]


def test_data_parallel_flags_are_replica_options_not_engine_arguments():
    from jaxpaged.server.args import replica_options_from_args

    args = parse(["-dp", "2", "--ray-address", "10.0.0.1:6379", "-tp", "2"])
    options = replica_options_from_args(args)
    assert (options.data_parallel_size, options.ray_address) == (2, "10.0.0.1:6379")
    assert engine_config_from_args(args, "/models/x").tensor_parallel_size == 2  # per replica
    assert replica_options_from_args(parse([])).data_parallel_size == 1
    with pytest.raises(ValueError, match="data_parallel_size must be a positive integer, got 0"):
        replica_options_from_args(parse(["--data-parallel-size", "0"]))
    with pytest.raises(ValueError, match="--ray-address 10.0.0.1:6379 needs --data-parallel-size"):
        replica_options_from_args(parse(["--ray-address", "10.0.0.1:6379"]))
