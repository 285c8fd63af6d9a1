"""The batched paged engine through vLLM's `LLM` API, against HF goldens and against itself."""

import jax
import pytest

from jaxpaged import LLM, SamplingParams
from llm_testing import (GREEDY, MODEL, compilations_during, golden_prompts, make_llm,
                         random_prompts, run_varied_workload, token_ids)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return make_llm(tiny_checkpoint)


def test_batched_greedy_equals_hf_goldens_with_chunked_prefill(llm):
    prompts, expected = golden_prompts()
    # 65 prompt tokens over a 32-token budget: prefill is chunked and mixed with decodes.
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected


@pytest.mark.parametrize("overrides", [
    dict(enable_chunked_prefill=False, max_num_batched_tokens=128),
    dict(enable_prefix_caching=False),
    dict(num_gpu_blocks_override=12),  # 11 usable blocks of 16: forces preemption
    dict(async_scheduling=False),
    dict(async_scheduling=False, num_gpu_blocks_override=12),
], ids=["no-chunked-prefill", "no-prefix-cache", "preemption", "sync", "sync-preemption"])
def test_greedy_equals_hf_goldens_across_engine_modes(overrides, tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, **overrides)
    prompts, expected = golden_prompts()
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    if "num_gpu_blocks_override" in overrides:
        assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.scheduler.block_manager.num_free_blocks == \
        llm.llm_engine.kv_plan.num_blocks - 1


def test_batched_equals_each_request_alone(llm):
    prompts = random_prompts(7, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    batched = token_ids(llm.generate(prompts, params, use_tqdm=False))
    alone = [token_ids(llm.generate(p, params, use_tqdm=False))[0] for p in prompts]
    assert batched == alone


def test_prefix_cache_hits_keep_outputs_equal(llm):
    shared = random_prompts(1, seed=2, low=40, high=40)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + [7 + i, 9]} for i in range(3)]
    first = token_ids(llm.generate(prompts[:1], GREEDY, use_tqdm=False))
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert token_ids(outputs)[0] == first[0]
    assert all(o.num_cached_tokens is None or o.num_cached_tokens >= 0 for o in outputs)
    stats = llm.llm_engine.scheduler.make_stats()
    assert stats.prefix_cache_hits >= 32  # two full 16-token blocks reused per repeat


def test_parallel_sampling_shares_prompt_blocks_and_is_reproducible(llm):
    engine = llm.llm_engine
    prompt = random_prompts(1, seed=3, low=40, high=40)[0]
    params = SamplingParams(n=3, temperature=1.5, max_tokens=8, seed=1234, ignore_eos=True)
    engine.add_request("shared", None, params, prompt_token_ids=prompt["prompt_token_ids"])
    blocks_seen = []
    while engine.has_unfinished_requests():
        engine.step()
        children = [r for r in engine.scheduler.requests.values() if r.parent_id == "shared"]
        if len(children) == 3:
            manager = engine.scheduler.block_manager
            blocks = [manager.get_block_ids(c.request_id) for c in children]
            blocks_seen.append((blocks, [manager.ref_count(b) for b in blocks[0]]))
    assert blocks_seen, "the three samples ran together"
    blocks, ref_counts = blocks_seen[-1]  # all three running, each past the shared prompt
    shared = 40 // 16  # full prompt blocks before the last prompt token
    assert blocks[0][:shared] == blocks[1][:shared] == blocks[2][:shared]
    assert len({b[shared] for b in blocks}) == 3  # each sample owns its tail block
    assert ref_counts[:shared] == [3] * shared and ref_counts[shared] == 1
    assert engine.scheduler.block_manager.num_free_blocks == engine.kv_plan.num_blocks - 1
    again = [llm.generate(prompt, params, use_tqdm=False)[0] for _ in range(2)]
    texts = [[c.token_ids for c in o.outputs] for o in again]
    assert texts[0] == texts[1]
    assert len({tuple(t) for t in texts[0]}) > 1, "three samples should differ"
    assert [c.index for c in again[0].outputs] == [0, 1, 2]


def test_no_compilation_after_warmup(llm):
    """Lowering or compiling anything after warm-up is a stall a user would see."""
    assert compilations_during(lambda: run_varied_workload(llm)) == []
    # the listener must see compilations at all: a new program compiles
    assert compilations_during(lambda: jax.jit(lambda x: x * 3)(jax.numpy.ones(7)))


def test_outputs_in_input_order_with_text(llm):
    outputs = llm.generate(["Hello world", "The quick brown fox", "A"],
                           SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                           use_tqdm=False)
    assert [o.prompt for o in outputs] == ["Hello world", "The quick brown fox", "A"]
    tokenizer = llm.get_tokenizer()
    for o in outputs:
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert o.prompt_token_ids == tokenizer.encode(o.prompt)
        full = tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)
        # bytes of a character still incomplete at the end are dropped, as vLLM does
        assert full.startswith(o.outputs[0].text)
        assert set(full[len(o.outputs[0].text):]) <= {"\ufffd"}


def test_stop_strings_and_stop_tokens(llm):
    base = llm.generate("Once upon", SamplingParams(temperature=0.0, max_tokens=12,
                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_token = base.token_ids[3]
    out = llm.generate("Once upon", SamplingParams(temperature=0.0, max_tokens=12,
                                                   stop_token_ids=[stop_token]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:4] and out.finish_reason == "stop"
    assert out.stop_reason == stop_token
    stop_text = base.text[len(base.text) // 2:][:3]
    if stop_text.strip("\ufffd"):
        out = llm.generate("Once upon", SamplingParams(temperature=0.0, max_tokens=12,
                                                       ignore_eos=True, stop=[stop_text]),
                           use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop_text
        assert stop_text not in out.text and base.text.startswith(out.text)


def test_logprobs(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=4, logprobs=3,
                                               ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        assert max(entry.values(), key=lambda lp: lp.logprob) is entry[token]
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob
                                                       for t, e in zip(out.token_ids, out.logprobs)))


def test_chat_uses_the_template_once(llm):
    messages = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    assert out.prompt_token_ids.count(tokenizer.bos_token_id) == 1
    assert out.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("call, field", [
    (lambda llm: llm.generate(""), "prompt"),
    (lambda llm: llm.generate({"prompt_token_ids": []}), "prompt_token_ids"),
    (lambda llm: llm.generate({"prompt_token_ids": [5] * 200}), "max_model_len"),
    (lambda llm: llm.generate("hi", SamplingParams(logprobs=50)), "logprobs"),
    (lambda llm: llm.generate(["a", "b"], [SamplingParams()]), "sampling_params"),
    (lambda llm: llm.generate({"prompt_token_ids": [10**6]}), "token id"),
])
def test_bad_requests_raise_value_error_and_queue_nothing(llm, call, field):
    with pytest.raises(ValueError, match=field):
        call(llm)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=5), "stop"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_llm_argument_is_a_type_error(tiny_checkpoint):
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(str(tiny_checkpoint(MODEL)), max_num_sequences=4)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_checkpoint(MODEL)), max_model_len=10**6)


def test_a_kv_pool_too_small_for_max_model_len_fails_clearly(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"KV cache holds 48 tokens .* max_model_len=128"):
        make_llm(tiny_checkpoint, num_gpu_blocks_override=4)


def test_startup_reports_kv_capacity_and_concurrency(tiny_checkpoint, caplog):
    with caplog.at_level("INFO", logger="jaxpaged"):
        logger = __import__("logging").getLogger("jaxpaged")
        logger.propagate = True  # let caplog see the engine's lines for this test
        try:
            llm = make_llm(tiny_checkpoint, num_gpu_blocks_override=33)
        finally:
            logger.propagate = False
    assert llm.llm_engine.kv_plan.capacity_tokens == 32 * 16
    assert "KV cache: 512 tokens (32 blocks of 16), maximum concurrency 4.00x at " \
           "max_model_len=128" in caplog.text
