"""`jaxpaged convert`: HF checkpoint -> orbax checkpoint, and the named errors of bad checkpoints."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxpaged.cli import main as cli_main
from jaxpaged.converters.checkpoint import convert, is_converted
from jaxpaged.models.loader import load_model
from model_testing import generate

PROMPT = [437, 20, 31, 7, 99, 120, 5, 64, 300, 17, 2, 8, 41, 12, 6, 9, 3, 77, 101, 55]


def logits(model_dir, dtype="fp32"):
    model = load_model(model_dir, dtype=dtype, attn_impl="reference")
    return generate(model, PROMPT, max_new_tokens=1).prompt_logits


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(model_dir, edit):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("name", ["llama-bias", "llama-tied"])
def test_convert_load_run_matches_hf_dir(name, tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint(name)
    out = tmp_path / "converted"
    assert cli_main(["convert", str(hf_dir), str(out), "--dtype", "fp32"]) == 0
    assert is_converted(out) and (out / "tokenizer.json").is_file()
    np.testing.assert_array_equal(logits(out), logits(hf_dir))


def test_bf16_conversion_loads_as_bf16_and_fp32(tiny_checkpoint, tmp_path):
    out = tmp_path / "bf16"
    convert(tiny_checkpoint("llama-gqa"), out, dtype="bf16")
    ref = logits(tiny_checkpoint("llama-gqa"))
    for dtype in ("bf16", "fp32"):
        err = np.linalg.norm(logits(out, dtype) - ref) / np.linalg.norm(ref)
        assert err < 3e-2


def test_sharded_safetensors_read_like_single_file(tiny_checkpoint):
    np.testing.assert_array_equal(logits(tiny_checkpoint("llama-gqa", shards=3)),
                                  logits(tiny_checkpoint("llama-gqa")))


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    bad = copy_checkpoint(tiny_checkpoint("llama-mha"), tmp_path / "bad")
    rewrite_weights(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        convert(bad, tmp_path / "out")


def test_misshaped_tensor_is_named(tiny_checkpoint, tmp_path):
    bad = copy_checkpoint(tiny_checkpoint("llama-mha"), tmp_path / "bad")

    def truncate(t):
        name = "model.layers.0.self_attn.k_proj.weight"
        t[name] = t[name][:-1]
    rewrite_weights(bad, truncate)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
        load_model(bad, dtype="fp32")


def test_unknown_tensor_is_named(tiny_checkpoint, tmp_path):
    bad = copy_checkpoint(tiny_checkpoint("llama-mha"), tmp_path / "bad")
    rewrite_weights(bad, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight":
                                             np.ones(4, np.float32)}))
    with pytest.raises(ValueError, match=r"unknown tensor.*q_norm"):
        convert(bad, tmp_path / "out")


def test_duplicate_tensor_across_shards_is_named(tiny_checkpoint, tmp_path):
    bad = copy_checkpoint(tiny_checkpoint("llama-mha", shards=2), tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))
    moved = next(n for n, f in index["weight_map"].items() if f == first)
    extra = load_file(str(bad / second))
    extra[moved] = load_file(str(bad / first))[moved]
    save_file(extra, str(bad / second))
    with pytest.raises(ValueError, match=rf"duplicate tensor '{moved}'"):
        convert(bad, tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["FalconForCausalLM"]}, "FalconForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_unsupported_config_is_named(change, message, tiny_checkpoint, tmp_path):
    bad = copy_checkpoint(tiny_checkpoint("llama-mha"), tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        convert(bad, tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        load_model(bad)


def test_cli_reports_errors_without_traceback(tiny_checkpoint, tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    assert cli_main(["convert", str(tiny_checkpoint("llama-mha")), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
