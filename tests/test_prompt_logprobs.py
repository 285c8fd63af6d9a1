"""``SamplingParams.prompt_logprobs`` (vLLM semantics) against Hugging Face's fp32 prompt logits.

The goldens hold HF's logits at every prompt position; prompt token i's logprob is
``log_softmax(logits[i - 1])[token_i]``. Every engine mode that changes which step computes which
prompt position (chunked prefill, prefix cache, n > 1 parent/child split, preemption) must report
each prompt token exactly once, with the same numbers.
"""

import contextlib

import numpy as np
import pytest

from conftest import GOLDEN_DIR
from engine_testing import FakeRunner, create_requests, create_scheduler
from jaxpaged import SamplingParams
from jaxpaged.sampling_params import RequestOutputKind
from llm_testing import MODEL, make_llm

TIE = 1e-4  # logprobs closer than this may rank either way between HF and us


def goldens() -> list[tuple[list[int], np.ndarray, list[int]]]:
    """(prompt ids, f64[P, V] raw logprobs at every prompt position, greedy ids) per prompt."""
    data = np.load(GOLDEN_DIR / f"{MODEL}.npz")
    count = sum(1 for k in data.files if k.startswith("prompt_ids_"))
    out = []
    for i in range(count):
        logits = data[f"prompt_logits_{i}"].astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        out.append((data[f"prompt_ids_{i}"].tolist(), logprobs, data[f"greedy_ids_{i}"].tolist()))
    return out


GOLDENS = goldens()


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return make_llm(tiny_checkpoint)


@contextlib.contextmanager
def recorded_positions(llm):
    """Records req_id -> [prompt logprob positions] of every step run inside the block."""
    runner = llm.llm_engine.runner
    dispatch = runner.dispatch  # every step passes here, with or without async scheduling
    seen: dict[str, list[int]] = {}

    def spy(scheduler_output):
        for s in scheduler_output.scheduled:
            if s.prompt_logprobs_positions:
                seen.setdefault(s.req_id, []).append(list(s.prompt_logprobs_positions))
        return dispatch(scheduler_output)

    runner.dispatch = spy
    try:
        yield seen
    finally:
        del runner.dispatch


def flat(chunks: list[list[int]]) -> list[int]:
    return [p for chunk in chunks for p in chunk]


def check_prompt_logprobs(prompt_logprobs, golden_index: int, num_top: int, tokenizer=None):
    ids, reference, _ = GOLDENS[golden_index]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for i in range(1, len(ids)):
        entry, ref, token = prompt_logprobs[i], reference[i - 1], ids[i]
        assert next(iter(entry)) == token, "the prompt token comes first"
        actual = entry[token]
        np.testing.assert_allclose(actual.logprob, ref[token], rtol=1e-4, atol=1e-4)
        assert (ref > ref[token] + TIE).sum() + 1 <= actual.rank <= (ref >= ref[token] - TIE).sum()
        descending = np.sort(ref)[::-1]
        top_ranks = set()
        for token_id, lp in entry.items():
            if token_id == token:
                continue
            assert 1 <= lp.rank <= num_top and lp.rank not in top_ranks
            top_ranks.add(lp.rank)
            np.testing.assert_allclose(lp.logprob, ref[token_id], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(ref[token_id], descending[lp.rank - 1], atol=TIE)
        missing = set(range(1, num_top + 1)) - top_ranks
        assert missing in (set(), {actual.rank}), "N top tokens; the prompt token may be one"
        if tokenizer is not None:
            assert all(lp.decoded_token == tokenizer.decode([t]) for t, lp in entry.items())


def golden_prompt(i: int) -> dict:
    return {"prompt_token_ids": GOLDENS[i][0]}


@pytest.mark.parametrize("num_top", [0, 5])
def test_prompt_logprobs_match_hf_goldens_with_chunked_prefill(llm, num_top):
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                            prompt_logprobs=num_top)
    with recorded_positions(llm) as seen:
        outputs = llm.generate([golden_prompt(i) for i in range(3)], params, use_tqdm=False)
    for i, output in enumerate(outputs):
        check_prompt_logprobs(output.prompt_logprobs, i, num_top, llm.get_tokenizer())
        assert output.outputs[0].token_ids == GOLDENS[i][2][:3]
    chunks = list(seen.values())
    assert [flat(c) for c in chunks] == [list(range(len(GOLDENS[i][0]) - 1)) for i in range(3)]
    assert len(chunks[2]) > 1, "the 38-token prompt is chunked over the 32-token budget"


def test_a_request_without_prompt_logprobs_is_unaffected(llm):
    params = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=p)
              for p in (None, 2, None)]
    with recorded_positions(llm) as seen:
        outputs = llm.generate([golden_prompt(i) for i in range(3)], params, use_tqdm=False)
    assert outputs[0].prompt_logprobs is None and outputs[2].prompt_logprobs is None
    check_prompt_logprobs(outputs[1].prompt_logprobs, 1, 2)
    assert [o.outputs[0].token_ids for o in outputs] == [g[2][:4] for g in GOLDENS]
    assert len(seen) == 1


def test_prefix_cache_is_not_read_but_is_filled(llm):
    engine = llm.llm_engine
    assert engine.scheduler.block_manager.reset_prefix_cache()
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    plain = SamplingParams(temperature=0.0, max_tokens=2)

    def hits_of(params):
        before = engine.scheduler.make_stats().prefix_cache_hits
        output = llm.generate(golden_prompt(2), params, use_tqdm=False)[0]
        return engine.scheduler.make_stats().prefix_cache_hits - before, output

    hits, first = hits_of(with_logprobs)
    assert hits == 0
    hits, _ = hits_of(plain)
    assert hits == 32, "the prompt_logprobs request published its two full blocks"
    hits, again = hits_of(with_logprobs)
    assert hits == 0, "cached blocks would skip positions whose logprobs are owed"
    check_prompt_logprobs(again.prompt_logprobs, 2, 1)
    assert again.prompt_logprobs == first.prompt_logprobs


@pytest.mark.parametrize("golden_index", [0, 2], ids=["forked-at-once", "parent-prefix"])
def test_parallel_sampling_reports_prompt_logprobs_once(llm, golden_index):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True,
                            prompt_logprobs=3)
    with recorded_positions(llm) as seen:
        output = llm.generate(golden_prompt(golden_index), params, use_tqdm=False)[0]
    check_prompt_logprobs(output.prompt_logprobs, golden_index, 3)
    assert [c.index for c in output.outputs] == [0, 1]
    num_prompt = len(GOLDENS[golden_index][0])
    assert sorted(flat(sum(seen.values(), []))) == list(range(num_prompt - 1))
    request_id = output.request_id
    assert f"{request_id}-1" not in seen, "only sample 0 computes the prompt's tail"
    if golden_index == 2:  # 38 tokens, 16-token blocks: the parent computes 32 of them
        assert flat(seen[request_id]) == list(range(32))
        assert flat(seen[f"{request_id}-0"]) == list(range(32, 37))


def test_delta_outputs_send_prompt_logprobs_once(llm):
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=0,
                            output_kind=RequestOutputKind.DELTA)
    engine.add_request("delta", None, params, prompt_token_ids=GOLDENS[1][0])
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    assert len(outputs) == 4
    check_prompt_logprobs(outputs[0].prompt_logprobs, 1, 0)
    assert all(o.prompt_logprobs is None for o in outputs[1:])


def test_preemption_recomputes_without_duplicating(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, num_gpu_blocks_override=12)  # 11 blocks of 16: preempts
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, prompt_logprobs=2)
    with recorded_positions(llm) as seen:
        outputs = llm.generate([golden_prompt(i) for i in range(3)], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for i, output in enumerate(outputs):
        check_prompt_logprobs(output.prompt_logprobs, i, 2)
        assert output.outputs[0].token_ids == GOLDENS[i][2]
    assert [flat(c) for c in seen.values()] == [list(range(len(g[0]) - 1)) for g in GOLDENS]


def test_scheduler_skips_reported_positions_after_a_mid_prefill_preemption():
    # 6 usable 4-token blocks, 4-token chunks: the decoding r0 preempts p0 inside its prompt
    scheduler = create_scheduler(num_blocks=7, block_size=4, max_num_batched_tokens=4,
                                 max_model_len=24)
    (r0,) = create_requests(1, 5, max_tokens=14)
    (p0,) = create_requests(1, 14, max_tokens=4, id_prefix="p", prompt_logprobs=1)
    scheduler.add_request(r0)
    scheduler.add_request(p0)
    runner = FakeRunner(scheduler)
    positions, owed_at_preemption = [], []
    while scheduler.has_unfinished_requests():
        out, _ = runner.step()
        if "p0" in out.preempted_req_ids:
            owed_at_preemption.append(p0.num_prompt_logprob_positions)
        positions += [list(s.prompt_logprobs_positions) for s in out.scheduled if s.req_id == "p0"]
        assert not any(s.prompt_logprobs_positions for s in out.scheduled if s.req_id == "r0")
    assert owed_at_preemption and 0 < owed_at_preemption[0] < 13
    assert flat(positions) == list(range(13))
