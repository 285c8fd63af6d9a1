"""The fp8 KV cache through the engine: capacity, scales (checkpoint, calibrated, 1.0), greedy
agreement with a full-precision pool, and the scheduler's features on an fp8 pool. The kernels'
own fp8 arithmetic is tested in test_kernel_*.py."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxpaged import LLM, SamplingParams
from jaxpaged.converters.checkpoint import convert
from jaxpaged.converters.kv_scales import SCALES_FILE
from jaxpaged.runner.kv_calibration import V_SCALE_RANGE, calibration_token_ids
from llm_testing import MODEL, golden_prompts, random_prompts, token_ids

ARGS = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, seed=0)
NUM_LAYERS = 2  # the tiny llama3-rope checkpoint's


def _llm(path, **overrides) -> LLM:
    return LLM(str(path), **{**ARGS, **overrides})


@pytest.fixture(scope="module")
def fp8_llm(tiny_checkpoint):
    """Calibrated fp8 pages; a pool of 12 blocks, so that a batch of the tests' prompts preempts
    (one engine for the module: every step shape compiles once)."""
    return _llm(tiny_checkpoint(MODEL), kv_cache_dtype="fp8", calculate_kv_scales=True,
                num_gpu_blocks_override=13)


def _with_scales(src, dst, k, v, names=("self_attn.k_scale", "self_attn.v_scale")):
    """A copy of the checkpoint at ``src`` whose safetensors also carry per-layer KV scales
    (a None scale: that layer's is not written)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for layer, pair in enumerate(zip(k, v)):
        for name, value in zip(names, pair):
            if value is not None:
                tensors[f"model.layers.{layer}.{name}"] = np.array(value, np.float32)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_fp8_pool_holds_four_times_the_fp32_tokens_and_says_so(tiny_checkpoint, caplog):
    path = tiny_checkpoint(MODEL)
    budget = dict(kv_cache_memory_bytes=1 << 20)
    full = _llm(path, **budget).llm_engine
    logger = logging.getLogger("jaxpaged")
    with caplog.at_level("INFO", logger="jaxpaged"):
        logger.propagate = True
        try:
            fp8 = _llm(path, kv_cache_dtype="fp8", **budget).llm_engine
        finally:
            logger.propagate = False
    assert str(fp8.runner.kv_cache.k.dtype) == "float8_e4m3fn"
    assert fp8.kv_plan.bytes_per_block * 4 == full.kv_plan.bytes_per_block
    assert fp8.kv_plan.capacity_tokens >= 4 * full.kv_plan.capacity_tokens - 16
    assert (f"KV cache: {fp8.kv_plan.capacity_tokens} tokens" in caplog.text
            and "float8_e4m3fn pool" in caplog.text)
    np.testing.assert_array_equal(np.asarray(fp8.runner.kv_cache.k_scale), np.ones(NUM_LAYERS))


def test_fp8_greedy_agrees_with_the_fp32_pool_for_the_first_tokens(tiny_checkpoint, fp8_llm):
    prompts, golden = golden_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert token_ids(fp8_llm.generate(prompts, params, use_tqdm=False)) == [g[:4] for g in golden]


def test_calibrated_v_scale_is_the_layer_amax_over_the_range(tiny_checkpoint, fp8_llm):
    """Layer 0's V, recomputed in numpy from the checkpoint: V = rmsnorm(embed[ids]) @ Wv^T."""
    path = tiny_checkpoint(MODEL)
    w = load_file(path / "model.safetensors")
    engine = fp8_llm.llm_engine
    ids = calibration_token_ids(engine.tokenizer, engine.model_config.vocab_size, 127)
    x = w["model.embed_tokens.weight"][ids].astype(np.float64)
    eps = engine.model_config.rms_norm_eps
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    x = x * w["model.layers.0.input_layernorm.weight"]
    v = x @ w["model.layers.0.self_attn.v_proj.weight"].T.astype(np.float64)
    expected = np.abs(v).max() / V_SCALE_RANGE
    assert engine.kv_scales.v[0] == pytest.approx(expected, rel=1e-3)
    assert all(s > 0 and s != 1.0 for s in engine.kv_scales.k + engine.kv_scales.v)
    np.testing.assert_allclose(np.asarray(engine.runner.kv_cache.v_scale), engine.kv_scales.v)


def test_checkpoint_scales_reach_the_pool_and_survive_conversion(tiny_checkpoint, tmp_path):
    """Layer 0 in compressed-tensors' names, layer 1 in the older ``*_proj.output_scale``."""
    k, v = [0.05, 0.02], [0.03, 0.5]
    hf = _with_scales(tiny_checkpoint(MODEL), tmp_path / "hf", k[:1], v[:1])
    hf = _with_scales(hf, tmp_path / "hf2", [None, k[1]], [None, v[1]],
                      ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"))
    from_hf = _llm(hf, kv_cache_dtype="fp8")
    cache = from_hf.llm_engine.runner.kv_cache
    np.testing.assert_allclose(np.asarray(cache.k_scale), k, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cache.v_scale), v, rtol=1e-6)
    convert(hf, tmp_path / "converted", dtype="fp32")
    assert (tmp_path / "converted" / SCALES_FILE).is_file()
    converted = _llm(tmp_path / "converted", kv_cache_dtype="fp8")
    assert converted.llm_engine.kv_scales == from_hf.llm_engine.kv_scales
    prompt = random_prompts(1, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert (token_ids(from_hf.generate(prompt, params, use_tqdm=False))
            == token_ids(converted.generate(prompt, params, use_tqdm=False)))


def test_checkpoint_scales_of_a_full_precision_pool_are_unused(tiny_checkpoint, tmp_path):
    hf = _with_scales(tiny_checkpoint(MODEL), tmp_path / "hf", [0.1, 0.1], [0.1, 0.1])
    engine = _llm(hf).llm_engine
    assert engine.kv_scales is None and engine.runner.kv_cache.k_scale is None


def test_incomplete_checkpoint_scales_are_refused_by_name(tiny_checkpoint, tmp_path):
    hf = _with_scales(tiny_checkpoint(MODEL), tmp_path / "hf", [0.1, 0.1], [0.1, None])
    with pytest.raises(ValueError, match="lacks v_scale of layer 1"):
        _llm(hf, kv_cache_dtype="fp8")


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv_cache_dtype="fp8_inc"), "kv_cache_dtype must be one of"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype must be one of"),
    (dict(calculate_kv_scales=True), "calculate_kv_scales=True needs an fp8 kv_cache_dtype"),
    (dict(kv_cache_dtype="bfloat16"), "kv_cache_dtype='bfloat16' needs a bfloat16 model"),
])
def test_bad_kv_cache_settings_are_refused(tiny_checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _llm(tiny_checkpoint(MODEL), **kwargs)


def test_scheduler_features_work_unchanged_on_an_fp8_pool(fp8_llm):
    """Chunked prefill (32-token budget), prefix caching, n > 1 sharing and preemption (a pool of
    12 blocks for 7 requests) on fp8 pages: a batch gives what each request gives alone."""
    preempted = fp8_llm.llm_engine.scheduler.make_stats().num_preemptions
    shared = random_prompts(1, seed=2, low=40, high=40)[0]["prompt_token_ids"]
    prompts = random_prompts(5, seed=1, low=20, high=60) + [
        {"prompt_token_ids": shared + [7 + i]} for i in range(2)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    batched = token_ids(fp8_llm.generate(prompts, params, use_tqdm=False))
    assert fp8_llm.llm_engine.scheduler.make_stats().num_preemptions > preempted
    alone = [token_ids(fp8_llm.generate(p, params, use_tqdm=False))[0] for p in prompts]
    assert batched == alone
    sampled = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    runs = [[c.token_ids for c in fp8_llm.generate(prompts[-1], sampled, use_tqdm=False)[0].outputs]
            for _ in range(2)]
    assert runs[0] == runs[1] and len({tuple(t) for t in runs[0]}) > 1
    manager = fp8_llm.llm_engine.scheduler.block_manager
    assert manager.num_free_blocks == fp8_llm.llm_engine.kv_plan.num_blocks - 1
