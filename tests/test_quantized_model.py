"""Quantized weights through the model (issue 14), on a tiny fp32 checkpoint.

- Our own quantization (``quant=QuantConfig(...)``) against the fp32 model: logits within a
  per-format relative bound, the first greedy tokens equal.
- Pre-quantized HF checkpoints, written by this test from the same fp32 weights with numpy and
  ml_dtypes (not our quantizer), in both layouts: compressed-tensors FP8 with per-channel scales
  gives the logits of our own fp8 quantization; vLLM's "fp8" layout with per-tensor scales (and
  static input scales) gives the logits of an fp32 checkpoint holding the dequantized weights.
- ``convert --quantization`` writes codes + scales that load without re-quantizing, to the
  logits of load-time quantization; quantization formats we do not read are refused by name.
- Memory: the weights of Llama-3-8B's shapes take about half the bytes of bf16.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxpaged.converters.checkpoint import convert
from jaxpaged.converters.hf_reader import iter_tensors
from jaxpaged.converters.quant_config import checkpoint_quantization, resolve_quantization
from jaxpaged.models.config import ModelConfig
from jaxpaged.models.linear import QuantConfig
from jaxpaged.models.loader import abstract_model, load_model
from model_testing import generate

MODEL = "llama3-rope"
PROMPT = [5, 17, 99, 23, 64, 300, 12, 7, 41, 250]
# Relative-norm error of the prompt logits against fp32 on the tiny random model (its logits
# are small and close together, so this is a loose, format-ordered bound), and how many greedy
# tokens must agree before a near-tie may flip one.
LOGIT_RTOL = {"int8": 0.05, "fp8": 0.15}
GREEDY_AGREE = {"int8": 2, "fp8": 2}
SAME_QUANTIZATION_RTOL = 1e-3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E4M3 = ml_dtypes.float8_e4m3fn


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def fp32_dir(tiny_checkpoint) -> pathlib.Path:
    return tiny_checkpoint(MODEL)


@pytest.fixture(scope="module")
def fp32_run(fp32_dir):
    return generate(load_model(fp32_dir, dtype="fp32"), PROMPT, max_new_tokens=6)


@pytest.fixture(scope="module")
def own_fp8_logits(fp32_dir) -> np.ndarray:
    model = load_model(fp32_dir, dtype="fp32", quant=QuantConfig("fp8"))
    return generate(model, PROMPT, max_new_tokens=1).prompt_logits


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_logits_and_greedy_stay_near_fp32(fp32_dir, fp32_run, method):
    model = load_model(fp32_dir, dtype="fp32", quant=QuantConfig(method))
    leaves = nnx.to_pure_dict(nnx.state(model))["layers"][0]
    assert leaves["attn"]["wqkv"].dtype.name == {"int8": "int8", "fp8": "float8_e4m3fn"}[method]
    assert leaves["mlp"]["w_down_scale"].shape == leaves["mlp"]["w_down"].shape[:-1]  # [*out, K]
    out = generate(model, PROMPT, max_new_tokens=6)
    rel = _rel(out.prompt_logits, fp32_run.prompt_logits)
    assert 0 < rel < LOGIT_RTOL[method]
    n = GREEDY_AGREE[method]
    assert out.token_ids[:n] == fp32_run.token_ids[:n]


# ------------------------------------------------------------------ pre-quantized HF checkpoints

def _is_projection(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS


def _write_prequantized(src: pathlib.Path, out: pathlib.Path, *, per_channel: bool,
                        quantization_config: dict, input_scales: bool,
                        dequantized_out: pathlib.Path | None = None) -> None:
    """``src``'s fp32 tensors with every projection as E4M3 codes and its ``weight_scale``
    (amax / 448 per output row, or per tensor), numpy only; ``dequantized_out``: the same
    checkpoint in fp32 holding ``codes * scale`` instead."""
    tensors, dequantized = {}, {}
    for name, w in iter_tensors(src):
        if not _is_projection(name):
            tensors[name] = dequantized[name] = w
            continue
        amax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max()
        scale = (np.asarray(amax, np.float32) / np.float32(448.0)).astype(np.float32)
        codes = (w / scale).astype(E4M3)
        tensors[name] = codes
        tensors[name + "_scale"] = scale if per_channel else np.asarray(scale).reshape(())
        if input_scales:
            tensors[name[:-len("weight")] + "input_scale"] = np.full((), 0.05, np.float32)
        dequantized[name] = codes.astype(np.float32) * scale
    for directory, weights in ((out, tensors), (dequantized_out, dequantized)):
        if directory is None:
            continue
        directory.mkdir(parents=True)
        save_file(weights, str(directory / "model.safetensors"))
        for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy2(src / side, directory / side)
        config = json.loads((src / "config.json").read_text())
        if directory == out:
            config["quantization_config"] = quantization_config
        (directory / "config.json").write_text(json.dumps(config))


COMPRESSED_TENSORS_FP8_DYNAMIC = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "quantization_status": "compressed", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False,
                    "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                              "dynamic": True, "symmetric": True}}}}
HF_FP8_STATIC = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}


def _prompt_logits(model_dir: pathlib.Path, requested: str | None = None) -> np.ndarray:
    quant, stored = resolve_quantization(requested, model_dir)
    model = load_model(model_dir, dtype="fp32", quant=quant, checkpoint_quantized=stored)
    return generate(model, PROMPT, max_new_tokens=1).prompt_logits


def test_compressed_tensors_channel_fp8_gives_our_own_fp8_logits(fp32_dir, own_fp8_logits,
                                                                 tmp_path):
    out = tmp_path / "ct"
    _write_prequantized(fp32_dir, out, per_channel=True, input_scales=False,
                        quantization_config=COMPRESSED_TENSORS_FP8_DYNAMIC)
    stored = checkpoint_quantization(out)
    assert (stored.method, stored.layout, stored.static_activations) == (
        "fp8", "compressed-tensors", False)
    # XLA's divide (a reciprocal multiply on the CPU) may round a few codes one step the other
    # way than numpy: 1e-3 is two orders below the distance of either from fp32.
    assert _rel(_prompt_logits(out), own_fp8_logits) < SAME_QUANTIZATION_RTOL
    assert _rel(_prompt_logits(out, "compressed-tensors"), own_fp8_logits) < SAME_QUANTIZATION_RTOL
    converted = tmp_path / "ct-converted"  # the codes are kept, not quantized again
    convert(out, converted, dtype="fp32")
    assert checkpoint_quantization(converted).layout == "converted"
    assert _rel(_prompt_logits(converted), _prompt_logits(out)) < 1e-6


def test_hf_fp8_per_tensor_gives_the_logits_of_its_dequantized_weights(fp32_dir, fp32_run,
                                                                       tmp_path):
    out, plain = tmp_path / "fp8", tmp_path / "dequantized"
    _write_prequantized(fp32_dir, out, per_channel=False, input_scales=True,
                        quantization_config=HF_FP8_STATIC, dequantized_out=plain)
    assert checkpoint_quantization(out).static_activations
    logits = _prompt_logits(out)
    assert _rel(logits, _prompt_logits(plain)) < 1e-5
    assert _rel(logits, fp32_run.prompt_logits) < LOGIT_RTOL["fp8"]


def _with_quantization_config(src: pathlib.Path, dst: pathlib.Path, qc: dict) -> pathlib.Path:
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return dst


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 4}, "quantization method 'awq'"),
    ({"quant_method": "gptq"}, "quantization method 'gptq'"),
    ({**HF_FP8_STATIC, "weight_block_size": [128, 128]}, "weight_block_size"),
    ({**HF_FP8_STATIC, "ignored_layers": ["model.layers.0.mlp.down_proj"]}, "ignored_layers"),
    ({**COMPRESSED_TENSORS_FP8_DYNAMIC, "format": "pack-quantized"}, "'pack-quantized'"),
])
def test_quantization_formats_we_do_not_read_are_refused_by_name(fp32_dir, tmp_path, qc, match):
    model_dir = _with_quantization_config(fp32_dir, tmp_path / "q", qc)
    with pytest.raises(ValueError, match=match):
        resolve_quantization(None, model_dir)


def test_requested_quantization_must_match_the_checkpoint(fp32_dir, tmp_path):
    model_dir = _with_quantization_config(fp32_dir, tmp_path / "q", HF_FP8_STATIC)
    with pytest.raises(ValueError, match="quantization='int8' does not match"):
        resolve_quantization("int8", model_dir)
    with pytest.raises(ValueError, match="needs a compressed-tensors checkpoint"):
        resolve_quantization("compressed-tensors", fp32_dir)
    assert resolve_quantization(None, fp32_dir) == (None, False)
    assert resolve_quantization("int8", fp32_dir) == (QuantConfig("int8"), False)


# ----------------------------------------------------------------- converted quantized checkpoint

def test_converted_int8_checkpoint_loads_without_requantizing(fp32_dir, tmp_path):
    out = tmp_path / "converted-int8"
    convert(fp32_dir, out, dtype="fp32", quantization="int8")
    assert json.loads((out / "jaxpaged_checkpoint.json").read_text())["quantization"] == "int8"
    quant, stored = resolve_quantization(None, out)
    assert quant == QuantConfig("int8") and stored
    loaded = load_model(out, dtype="fp32", quant=quant, checkpoint_quantized=True)
    at_load = load_model(fp32_dir, dtype="fp32", quant=QuantConfig("int8"))
    a, b = (nnx.to_pure_dict(nnx.state(m)) for m in (loaded, at_load))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ------------------------------------------------------------------------------------- memory

def _weight_bytes(cfg: ModelConfig, quant: QuantConfig | None) -> tuple[int, int]:
    """(all parameter bytes, bytes of the quantized projections and their scales)."""
    state = nnx.to_pure_dict(nnx.state(abstract_model(cfg, "bf16", "auto", quant)))
    total = projections = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        size = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        total += size
        if any(name in jax.tree_util.keystr(path) for name in ("wqkv", "wo", "w_gate_up",
                                                                "w_down")):
            projections += size
    return total, projections


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_llama3_8b_weights_take_about_half_the_bytes(method):
    cfg = ModelConfig.from_dir(pathlib.Path(__file__).parents[1] / "bench/configs/llama3-8b")
    total_bf16, proj_bf16 = _weight_bytes(cfg, None)
    total_q, proj_q = _weight_bytes(cfg, QuantConfig(method))
    assert proj_q / proj_bf16 < 0.501  # one byte per weight plus f32 scales per channel
    saved = proj_bf16 - proj_q
    assert total_q == total_bf16 - saved  # embeddings, norms and lm_head unchanged
    assert total_q / total_bf16 < 0.57


# ------------------------------------------------------------- the public API and command lines

def test_quantization_arguments_of_llm_serve_and_convert(fp32_dir, tmp_path, capsys):
    from jaxpaged.cli import main
    from jaxpaged.config import QUANT_MATMUL_KERNELS, EngineConfig
    from jaxpaged.pallas_kernels.quant_matmul import MATMUL_KERNELS
    from jaxpaged.server.args import add_server_arguments, engine_config_from_args

    assert QUANT_MATMUL_KERNELS == MATMUL_KERNELS
    assert EngineConfig.from_kwargs("/m", {"quantization": "fp8"}).quantization == "fp8"
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig.from_kwargs("/m", {"quantization": "awq"})
    with pytest.raises(ValueError, match="quant_matmul_kernel must be one of"):
        EngineConfig(model="/m", quant_matmul_kernel="cutlass")
    import argparse
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    for flag in ("-q", "--quantization"):
        config = engine_config_from_args(parser.parse_args([flag, "int8"]), "/m")
        assert config.quantization == "int8"
    config = engine_config_from_args(parser.parse_args(["-q", "fp8", "--quant-matmul-kernel",
                                                        "w8a8_pallas"]), "/m")
    assert (config.quantization, config.quant_matmul_kernel) == ("fp8", "w8a8_pallas")
    out = tmp_path / "fp8"
    assert main(["convert", str(fp32_dir), str(out), "--dtype", "fp32", "-q", "fp8"]) == 0
    assert "fp8 weights" in capsys.readouterr().out
    assert checkpoint_quantization(out).method == "fp8"


@pytest.mark.slow
def test_llm_with_int8_runs_the_quantized_model(fp32_dir):
    """The engine's greedy tokens equal the model-level greedy run of the same int8 model."""
    from jaxpaged import LLM, SamplingParams

    llm = LLM(str(fp32_dir), dtype="float32", quantization="int8", max_model_len=64,
              max_num_seqs=2, max_num_batched_tokens=32)
    assert llm.llm_engine.quant == QuantConfig("int8")
    out = llm.generate([{"prompt_token_ids": PROMPT}],
                       SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    model = load_model(fp32_dir, dtype="fp32", quant=QuantConfig("int8"))
    assert out == generate(model, PROMPT, max_new_tokens=6).token_ids
