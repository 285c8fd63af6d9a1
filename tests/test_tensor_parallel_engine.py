"""The engine under tensor parallelism on fake CPU devices (conftest.py starts jax with 8):
``LLM(tensor_parallel_size=4)`` on llama3-rope (2 KV heads, each copied to 2 devices) gives the
HF goldens and the same tokens as TP=1 through chunked prefill, prefix caching, n > 1 seeded
sampling and preemption; its pool is split over KV heads; nothing compiles after warm-up; and
``jaxpaged serve -tp 2`` answers completions and chat as the TP=1 engine does."""

from __future__ import annotations

import httpx
import pytest

from jaxpaged import SamplingParams
from jaxpaged.engine.llm_engine import _pool_size_text
from jaxpaged.server.args import engine_config_from_args
from llm_testing import (GREEDY, MODEL, compilations_during, golden_prompts, make_llm,
                         random_prompts, run_varied_workload, token_ids)
from server_testing import API_KEY, MODEL_NAME, start_server
from test_serve_args import parse

pytestmark = pytest.mark.slow

# 11 usable blocks of 16 tokens: the golden prompts together preempt (as test_llm's mode does).
SMALL_POOL = dict(num_gpu_blocks_override=12)


@pytest.fixture(scope="module")
def tp1(tiny_checkpoint):
    return make_llm(tiny_checkpoint, **SMALL_POOL)


@pytest.fixture(scope="module")
def tp4(tiny_checkpoint):
    return make_llm(tiny_checkpoint, tensor_parallel_size=4, **SMALL_POOL)


def test_greedy_equals_hf_goldens_and_tp1_with_chunked_prefill_and_preemption(tp4, tp1):
    prompts, expected = golden_prompts()
    assert token_ids(tp4.generate(prompts, GREEDY, use_tqdm=False)) == expected
    assert token_ids(tp1.generate(prompts, GREEDY, use_tqdm=False)) == expected
    scheduler = tp4.llm_engine.scheduler
    assert scheduler.num_preemptions > 0
    assert scheduler.block_manager.num_free_blocks == tp4.llm_engine.kv_plan.num_blocks - 1


def test_prefix_cache_hits_and_seeded_samples_equal_tp1(tp4, tp1):
    shared = random_prompts(1, seed=2, low=40, high=40)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + [7 + i, 9]} for i in range(3)]
    hits = tp4.llm_engine.scheduler.make_stats().prefix_cache_hits
    assert token_ids(tp4.generate(prompts, GREEDY, use_tqdm=False)) == \
        token_ids(tp1.generate(prompts, GREEDY, use_tqdm=False))
    assert tp4.llm_engine.scheduler.make_stats().prefix_cache_hits >= hits + 32
    params = SamplingParams(n=3, temperature=1.5, max_tokens=8, seed=1234, ignore_eos=True)
    samples = [[c.token_ids for c in llm.generate(prompts[0], params, use_tqdm=False)[0].outputs]
               for llm in (tp4, tp1)]
    assert samples[0] == samples[1]
    assert len({tuple(s) for s in samples[0]}) > 1, "three samples should differ"


def test_the_pool_is_split_over_kv_heads(tp4):
    engine = tp4.llm_engine
    pool = engine.runner.kv_cache.k  # 2 KV heads copied to 4: one head per device
    assert tuple(pool.sharding.spec) == (None, None, "tp")
    assert len(pool.sharding.device_set) == 4
    assert {s.data.shape for s in pool.addressable_shards} == {(pool.shape[0], 16, 1, 32)}
    plan = engine.kv_plan
    assert plan.num_devices == 4 and plan.total_bytes == 4 * plan.num_blocks * plan.bytes_per_block
    assert plan.bytes_per_block == 2 * engine.model_config.num_layers * 16 * 1 * 32 * 4
    assert _pool_size_text(plan).endswith("over 4 devices (0.00 GiB each, split by KV heads)")


def test_no_compilation_after_warmup(tp4):
    assert compilations_during(lambda: run_varied_workload(tp4)) == []


def test_logprobs_and_prompt_logprobs_equal_tp1(tp4, tp1):
    prompt = random_prompts(1, seed=5, low=20, high=20)[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    outs = [llm.generate(prompt, params, use_tqdm=False)[0] for llm in (tp4, tp1)]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    for sharded, single in zip(outs[0].outputs[0].logprobs, outs[1].outputs[0].logprobs):
        assert sharded.keys() == single.keys()
        for token in single:
            assert sharded[token].logprob == pytest.approx(single[token].logprob, abs=1e-4)
    for sharded, single in zip(outs[0].prompt_logprobs[1:], outs[1].prompt_logprobs[1:]):
        assert sharded.keys() == single.keys()
        for token in single:
            assert sharded[token].logprob == pytest.approx(single[token].logprob, abs=1e-4)


def test_serve_with_tp_2_answers_completions_and_chat(tiny_checkpoint, tp1):
    argv = [str(tiny_checkpoint(MODEL)), "-tp", "2", "--dtype", "float32", "--max-model-len",
            "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
            "--num-gpu-blocks-override", "12"]
    config = engine_config_from_args(parse(argv), str(tiny_checkpoint(MODEL)))
    assert config.tensor_parallel_size == 2
    server = start_server(config, api_keys=(API_KEY,))
    try:
        assert server.engine.runner.mesh.devices.size == 2
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
            completion = client.post("/v1/completions", json=dict(
                model=MODEL_NAME, prompt="The small engine", max_tokens=8, temperature=0.0))
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            chat = client.post("/v1/chat/completions", json=dict(
                model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0.0))
    finally:
        server.stop()
    assert completion.status_code == 200 and chat.status_code == 200
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    assert completion.json()["choices"][0]["text"] == \
        tp1.generate("The small engine", greedy, use_tqdm=False)[0].outputs[0].text
    assert chat.json()["choices"][0]["message"]["content"] == \
        tp1.chat(messages, greedy, use_tqdm=False)[0].outputs[0].text
