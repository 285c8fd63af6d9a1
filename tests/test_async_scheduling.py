"""Async scheduling (host/device overlap): the same outputs as the synchronous engine and HF."""

import random

import pytest

from jaxpaged import SamplingParams
from jaxpaged.core.request import RequestStatus
from llm_testing import (GREEDY, compilations_during, golden_prompts, make_llm, random_prompts,
                         run_varied_workload, token_ids)


@pytest.fixture(scope="module")
def async_llm(tiny_checkpoint):
    return make_llm(tiny_checkpoint, async_scheduling=True)


@pytest.fixture(scope="module")
def sync_llm(tiny_checkpoint):
    return make_llm(tiny_checkpoint)


def all_blocks_free(llm) -> bool:
    engine = llm.llm_engine
    return engine.scheduler.block_manager.num_free_blocks == engine.kv_plan.num_blocks - 1


def test_greedy_equals_hf_goldens_with_chunked_prefill(async_llm, monkeypatch):
    scheduler = async_llm.llm_engine.scheduler
    schedule, unknown_tokens = scheduler.schedule, []

    def counting_schedule():
        out = schedule()
        unknown_tokens.append(sum(t == -1 for s in out.scheduled for t in s.token_ids))
        return out

    monkeypatch.setattr(scheduler, "schedule", counting_schedule)
    prompts, expected = golden_prompts()
    assert token_ids(async_llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    # decodes really were scheduled before their previous token reached the host
    assert sum(unknown_tokens) >= len(prompts) * (GREEDY.max_tokens - 2)
    assert all_blocks_free(async_llm)


def test_greedy_equals_hf_goldens_under_preemption(tiny_checkpoint, monkeypatch):
    llm = make_llm(tiny_checkpoint, async_scheduling=True, num_gpu_blocks_override=12)
    scheduler = llm.llm_engine.scheduler
    apply_sample, resolved_after_preemption = scheduler._apply_sample, []

    def recording_apply_sample(request, scheduled, sampled):
        if request.status == RequestStatus.PREEMPTED:
            resolved_after_preemption.append(request.request_id)
        return apply_sample(request, scheduled, sampled)

    monkeypatch.setattr(scheduler, "_apply_sample", recording_apply_sample)
    prompts, expected = golden_prompts()
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    assert scheduler.num_preemptions > 0
    # a request preempted while its token was in flight still got that token
    assert resolved_after_preemption
    assert all_blocks_free(llm)


def test_prefix_cache_hits_keep_outputs_equal(async_llm):
    prompts, expected = golden_prompts()
    engine = async_llm.llm_engine
    hits_before = engine.scheduler.make_stats().prefix_cache_hits
    # the same prompts again (their blocks are cached now), then with a shared longer prefix
    assert token_ids(async_llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    assert engine.scheduler.make_stats().prefix_cache_hits > hits_before
    prefix = random_prompts(1, seed=9, low=40, high=40)[0]["prompt_token_ids"]
    shared = [{"prompt_token_ids": prefix + [7 + i, 11 + i]} for i in range(3)]
    alone = [async_llm.generate(p, GREEDY, use_tqdm=False)[0] for p in shared]
    batched = async_llm.generate(shared, GREEDY, use_tqdm=False)
    assert token_ids(batched) == token_ids(alone)


def test_seeded_sampling_equals_sync_engine(async_llm, sync_llm):
    prompts = random_prompts(6, seed=5)
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=10, ignore_eos=True,
                             min_tokens=i % 3) for i in range(6)]
    assert (token_ids(async_llm.generate(prompts, params, use_tqdm=False))
            == token_ids(sync_llm.generate(prompts, params, use_tqdm=False)))


@pytest.mark.parametrize("max_tokens", [1, 2, 3])
def test_short_max_tokens_equal_sync_engine(async_llm, sync_llm, max_tokens):
    prompts = random_prompts(5, seed=max_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    got = async_llm.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(sync_llm.generate(prompts, params, use_tqdm=False))
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in got)
    assert all(o.outputs[0].finish_reason == "length" for o in got)
    assert all_blocks_free(async_llm)


def test_stop_tokens_strings_and_min_tokens_equal_sync_engine(async_llm, sync_llm):
    base = sync_llm.generate("Once upon", SamplingParams(temperature=0.0, max_tokens=12,
                                                         ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    stop_token = base.token_ids[3]
    stop_text = base.text[len(base.text) // 2:][:3]
    cases = [SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_token]),
             SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_token],
                            min_tokens=6),
             SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop_text])]
    for params in cases:
        got = async_llm.generate(["Once upon", "Hello world"], params, use_tqdm=False)
        want = sync_llm.generate(["Once upon", "Hello world"], params, use_tqdm=False)
        for g, w in zip(got, want):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            assert g.outputs[0].text == w.outputs[0].text
            assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
            assert g.outputs[0].stop_reason == w.outputs[0].stop_reason
    first = async_llm.generate("Once upon", cases[0], use_tqdm=False)[0].outputs[0]
    assert first.token_ids == base.token_ids[:4] and first.finish_reason == "stop"
    assert all_blocks_free(async_llm)


def test_parallel_sampling_and_penalties_equal_sync_engine(async_llm, sync_llm):
    prompt = random_prompts(1, seed=3, low=40, high=40)[0]
    cases = [SamplingParams(n=3, temperature=1.5, max_tokens=8, seed=1234, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                            repetition_penalty=1.3, frequency_penalty=0.5)]
    for params in cases:
        got = async_llm.generate(prompt, params, use_tqdm=False)[0]
        want = sync_llm.generate(prompt, params, use_tqdm=False)[0]
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    assert all_blocks_free(async_llm)


def test_aborts_mid_run_free_every_block(async_llm):
    engine = async_llm.llm_engine
    rng = random.Random(0)
    prompts = random_prompts(6, seed=11)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"abort-{i}", None, SamplingParams(max_tokens=30, ignore_eos=True),
                           prompt_token_ids=prompt["prompt_token_ids"])
    live = {f"abort-{i}" for i in range(6)}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                live.discard(output.request_id)
        steps += 1
        if steps % 3 == 0 and live:  # abort while the step just dispatched is in flight
            victim = rng.choice(sorted(live))
            engine.abort_request(victim)
            live.discard(victim)
    assert engine._in_flight is None and not engine.scheduler.requests
    assert all_blocks_free(async_llm)


def test_no_compilation_after_warmup(async_llm):
    assert compilations_during(lambda: run_varied_workload(async_llm)) == []


def test_engine_is_idle_once_the_last_request_finishes(async_llm):
    """The step dispatched after the last token must not keep the engine busy (a server loop
    would see an empty step with nothing running)."""
    engine = async_llm.llm_engine
    prompt = random_prompts(1, seed=12)[0]["prompt_token_ids"]
    engine.add_request("idle", None, SamplingParams(max_tokens=4, ignore_eos=True),
                       prompt_token_ids=prompt)
    finished_at_step, steps = None, 0
    while engine.has_unfinished_requests():
        steps += 1
        outputs = engine.step()
        if any(o.finished for o in outputs):
            finished_at_step = steps
    assert finished_at_step == steps
    engine.add_request("gone", None, SamplingParams(max_tokens=20, ignore_eos=True),
                       prompt_token_ids=prompt)
    engine.step()
    engine.step()
    assert engine._in_flight is not None
    engine.abort_request("gone")
    assert not engine.has_unfinished_requests() and all_blocks_free(async_llm)


def test_max_model_len_cap_and_prompt_logprobs_equal_sync_engine(async_llm, sync_llm):
    long_prompt = random_prompts(1, seed=21, low=122, high=122)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    got = async_llm.generate(long_prompt, params, use_tqdm=False)[0].outputs[0]
    want = sync_llm.generate(long_prompt, params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) == 128 - 122
    assert got.finish_reason == "length"
    prompts = random_prompts(3, seed=22, low=20, high=50)
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, prompt_logprobs=2,
                            ignore_eos=True)
    got = async_llm.generate(prompts, params, use_tqdm=False)
    want = sync_llm.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.prompt_logprobs == w.prompt_logprobs
        assert g.outputs[0].logprobs == w.outputs[0].logprobs
    assert all_blocks_free(async_llm)


def test_packer_points_unknown_tokens_at_the_previous_samples():
    from jaxpaged.runner.buckets import StepShape
    from jaxpaged.core.scheduler_output import ScheduledRequest
    from jaxpaged.runner.step_inputs import StepPacker

    def scheduled(req_id, token_ids, start):
        return ScheduledRequest(req_id=req_id, token_ids=token_ids, num_computed_tokens=start,
                                block_ids=[1, 2], do_sample=True,
                                sampling_params=SamplingParams(), prompt_token_ids=[5] * 8,
                                output_token_ids=[])

    packer = StepPacker(block_size=16, table_width=4)
    batch = [scheduled("a", [-1], 9), scheduled("b", [3, 4, 5], 2), scheduled("c", [-1], 20)]
    inputs = packer.pack(batch, StepShape(num_tokens=8, num_seqs=4, decode_only=False),
                         {"a": 2, "c": 0, "x": 1})
    assert inputs.prev_source_rows.tolist() == [2, -1, -1, -1, 0, -1, -1, -1]
    assert inputs.token_ids.tolist() == [0, 3, 4, 5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="'b'"):
        packer.pack([scheduled("b", [3, -1], 2)],
                    StepShape(num_tokens=4, num_seqs=2, decode_only=False), {"a": 0})
