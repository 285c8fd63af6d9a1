"""KV pool sizing: the CPU pool's size, and max_model_len lowered to fit the pool when the user
did not set it (vLLM's behaviour), refused when they did."""

import logging

import jax.numpy as jnp
import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged.models.config import ModelConfig
from jaxpaged.runner.kv_sizing import (MAX_CPU_KV_CACHE_BYTES, MIN_CPU_KV_CACHE_BYTES, KVPlan,
                                       fit_max_model_len, plan_kv_cache)

MODEL = "llama3-rope"


def cpu_plan(cfg: ModelConfig, max_model_len: int, max_num_seqs: int = 16) -> KVPlan:
    return plan_kv_cache(cfg, dtype=jnp.float32, block_size=16, max_model_len=max_model_len,
                         max_num_seqs=max_num_seqs, gpu_memory_utilization=0.9,
                         activation_bytes=0)


def test_cpu_pool_holds_a_full_context_of_the_default_model(smollm2_dir):
    cfg = ModelConfig.from_dir(smollm2_dir)
    plan = cpu_plan(cfg, cfg.max_position_embeddings)
    assert plan.num_blocks * plan.bytes_per_block <= MAX_CPU_KV_CACHE_BYTES
    assert fit_max_model_len(plan, cfg.max_position_embeddings, may_lower=False) == \
        cfg.max_position_embeddings


def test_cpu_pool_of_a_tiny_model_gets_the_floor(tiny_checkpoint):
    plan = cpu_plan(ModelConfig.from_dir(tiny_checkpoint(MODEL)), 512)
    assert plan.num_blocks == MIN_CPU_KV_CACHE_BYTES // plan.bytes_per_block


def test_max_model_len_is_lowered_only_when_not_set(caplog):
    plan = KVPlan(num_blocks=364, block_size=16, bytes_per_block=1)  # 5808 tokens
    assert fit_max_model_len(plan, 4096, may_lower=False) == 4096
    with caplog.at_level(logging.WARNING, logger="jaxpaged"):
        logging.getLogger("jaxpaged").propagate = True
        try:
            assert fit_max_model_len(plan, 8192, may_lower=True) == 5808
        finally:
            logging.getLogger("jaxpaged").propagate = False
    assert "max_model_len lowered from 8192 (the model's) to 5808" in caplog.text
    with pytest.raises(ValueError, match=r"KV cache holds 5808 tokens .* max_model_len=8192"):
        fit_max_model_len(plan, 8192, may_lower=False)
    with pytest.raises(ValueError, match="KV cache holds 0 tokens"):
        fit_max_model_len(KVPlan(num_blocks=1, block_size=16, bytes_per_block=1), 64,
                          may_lower=True)


def test_engine_without_max_model_len_fits_it_to_the_pool(tiny_checkpoint):
    # 9 blocks of 16 tokens (8 usable): max_model_len becomes 128 instead of the model's 512
    llm = LLM(str(tiny_checkpoint(MODEL)), dtype="float32", max_num_seqs=2,
              max_num_batched_tokens=32, num_gpu_blocks_override=9)
    assert llm.llm_engine.max_model_len == 128
    output = llm.generate("Once upon a time", SamplingParams(max_tokens=4, ignore_eos=True),
                          use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="max_model_len=128"):
        llm.generate({"prompt_token_ids": [5] * 200}, use_tqdm=False)
