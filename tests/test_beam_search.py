"""Beam search inside the engine (``LLM.beam_search``) against Hugging Face's, and its blocks.

Goldens: ``tests/golden/beam_search.npz`` from ``tests/golden/make_beam_goldens.py``. Without an
EOS, HF's ``generate(num_beams=k, num_return_sequences=k, do_sample=False, length_penalty=1.0,
early_stopping=False)`` and vLLM's beam search pick the same beams (same lengths, so both order
by the cumulative logprob), and the engine must match HF token for token. With an EOS the two
rules differ (HF: only EOS candidates among the step's best k finish, scored by the generated
length, early stop; vLLM: every EOS candidate finishes, scored by the whole length less the
EOS, always max_tokens steps); the EOS case is therefore compared with vLLM's rule run on the HF
model, as the golden script documents.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import GOLDEN_DIR
from jaxpaged import BeamSearchOutput, BeamSearchParams, LLM, SamplingParams
from jaxpaged.core.beam_group import get_beam_search_score
from jaxpaged.core.request import RequestStatus
from llm_testing import MODEL, compilations_during, golden_prompts, make_llm

GOLDEN = np.load(GOLDEN_DIR / "beam_search.npz")
PROMPTS, GREEDY_IDS = golden_prompts()
NUM_NEW_TOKENS = GOLDEN["hf_ids_0_2"].shape[1]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return make_llm(tiny_checkpoint)


def check_pool(engine) -> None:
    """Every block's ref count is the number of tables holding it; nothing else is held."""
    manager = engine.scheduler.block_manager
    holders: dict[int, int] = {}
    for table in manager.tables.values():
        for block_id in table.block_ids:
            holders[block_id] = holders.get(block_id, 0) + 1
    for block in manager.pool.blocks[1:]:
        assert block.ref_cnt == holders.get(block.block_id, 0), block.block_id
    assert manager.num_free_blocks == manager.num_blocks - 1 - len(holders)


def test_params_are_validated():
    for bad in (dict(beam_width=0, max_tokens=4), dict(beam_width=2, max_tokens=0),
                dict(beam_width=2, max_tokens=4, temperature=-1.0),
                dict(beam_width=2, max_tokens=4, length_penalty=float("nan")),
                dict(beam_width=True, max_tokens=4)):
        with pytest.raises(ValueError):
            BeamSearchParams(**bad)


def test_score_is_vllms():
    assert get_beam_search_score([1, 2, 3, 4], -2.0, eos_token_id=9) == -0.5
    assert get_beam_search_score([1, 2, 3, 9], -2.0, eos_token_id=9) == pytest.approx(-2 / 3)
    assert get_beam_search_score([1, 2, 3, 4], -2.0, 9, length_penalty=2.0) == -2.0 / 16


@pytest.mark.slow
def test_matches_hf_beam_search(llm):
    """Token for token HF's beams and order, cumulative logprobs to fp32 rounding; the 38-token
    prompt is prefilled in chunks (max_num_batched_tokens=32), prompts of one call run as
    concurrent groups, and nothing compiles."""
    for width in (2, 4):
        indices = [i for i, k in GOLDEN["cases"].tolist() if k == width]
        params = BeamSearchParams(beam_width=width, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
        outputs: list[BeamSearchOutput] = []
        compiled = compilations_during(
            lambda: outputs.extend(llm.beam_search([PROMPTS[i] for i in indices], params)))
        assert compiled == []
        for i, output in zip(indices, outputs):
            prompt = PROMPTS[i]["prompt_token_ids"]
            hf = GOLDEN[f"hf_ids_{i}_{width}"].tolist()
            assert [s.tokens for s in output.sequences] == [prompt + row for row in hf], (i, width)
            np.testing.assert_allclose([s.cum_logprob for s in output.sequences],
                                       GOLDEN[f"hf_cum_{i}_{width}"], atol=2e-4)
            for seq in output.sequences:
                assert seq.finish_reason == "length" and seq.stop_reason is None
                assert len(seq.logprobs) == NUM_NEW_TOKENS
                assert all(len(step) == 2 * width for step in seq.logprobs)
                assert seq.text == llm.get_tokenizer().decode(seq.tokens[len(prompt):])
    check_pool(llm.llm_engine)
    manager = llm.llm_engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks - 1


@pytest.mark.slow
def test_blocks_are_shared_per_step(llm):
    """A 4-beam search holds the prompt's full blocks once and at most each beam's own blocks
    past them; ref counts match the tables every step; all blocks return at the end."""
    engine = llm.llm_engine
    manager = engine.scheduler.block_manager
    bs = manager.block_size
    prompt = PROMPTS[1]["prompt_token_ids"]  # 20 tokens: one full shared block, one partial
    engine.add_beam_search("blocks", None, BeamSearchParams(4, NUM_NEW_TOKENS, ignore_eos=True),
                           prompt_token_ids=prompt)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        check_pool(engine)
        beams = [r for r in engine.scheduler.requests.values()]
        if not beams:
            continue
        length = max(r.num_computed_tokens for r in beams)
        held = manager.num_blocks - 1 - manager.num_free_blocks
        shared = len(prompt) // bs
        one_sequence = manager.num_blocks_for(length)
        assert held <= shared + len(beams) * (one_sequence - shared)
        assert held <= one_sequence * len(beams)
        if len(beams) == 4:
            assert manager.ref_count(manager.get_block_ids(beams[0].request_id)[0]) == 4
    assert steps >= NUM_NEW_TOKENS
    assert engine.take_beam_search_outputs()["blocks"].sequences[0].tokens[:len(prompt)] == prompt
    assert manager.num_free_blocks == manager.num_blocks - 1


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_aborts_return_every_block(llm, data):
    """Beam groups of random widths and lengths next to a plain request, some aborted after a
    random number of steps: ref counts stay consistent and every block comes back."""
    engine = llm.llm_engine
    manager = engine.scheduler.block_manager
    # Everything is drawn before the engine is touched: hypothesis may end an example at any
    # draw (StopTest), and the module's engine must not keep a half-added example's groups.
    searches = []
    for g in range(data.draw(st.integers(1, 2))):
        length = data.draw(st.integers(1, 40))
        prompt = [5 + (7 * g + 3 * t) % 400 for t in range(length)]
        params = BeamSearchParams(beam_width=data.draw(st.integers(1, 3)),
                                  max_tokens=data.draw(st.integers(1, 8)),
                                  ignore_eos=data.draw(st.booleans()))
        searches.append((f"g{g}", prompt, params))
    abort_at = {g: data.draw(st.integers(0, 10)) for g, _, _ in searches}
    for g, prompt, params in searches:
        engine.add_beam_search(g, None, params, prompt_token_ids=prompt)
    engine.add_request("plain", None, SamplingParams(temperature=0.0, max_tokens=5),
                       prompt_token_ids=PROMPTS[0]["prompt_token_ids"])
    step = 0
    while engine.has_unfinished_requests():
        for g, when in abort_at.items():
            if when == step:
                engine.abort_request(g)
        engine.step()
        check_pool(engine)
        step += 1
    engine.take_beam_search_outputs()
    assert not engine.scheduler.requests
    assert manager.num_free_blocks == manager.num_blocks - 1


@pytest.mark.slow
def test_eos_preemption_and_no_prefix_caching(tiny_checkpoint, tmp_path):
    """An EOS that ends beams early (vLLM's rule, see the module docstring), in a pool so small
    that the beams and two greedy requests preempt each other (the group recomputes), with
    prefix caching off; the greedy requests still match HF's greedy goldens."""
    model_dir = tmp_path / "eos"
    shutil.copytree(tiny_checkpoint(MODEL), model_dir)
    eos = int(GOLDEN["eos_token_id"])
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model_dir / name).read_text())
        config["eos_token_id"] = eos
        (model_dir / name).write_text(json.dumps(config))
    llm = LLM(str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=6,
              max_num_batched_tokens=32, seed=0, skip_tokenizer_init=True,
              num_gpu_blocks_override=9, enable_prefix_caching=False)
    engine = llm.llm_engine
    width = len(GOLDEN["eos_cum"])
    prompt = GOLDEN["eos_ids_0"].tolist()[:len(PROMPTS[1]["prompt_token_ids"])]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i in (0, 1):
        engine.add_request(f"greedy{i}", None, greedy,
                           prompt_token_ids=PROMPTS[i]["prompt_token_ids"])
    engine.add_beam_search("eos", None, BeamSearchParams(width, NUM_NEW_TOKENS),
                           prompt_token_ids=prompt)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
        check_pool(engine)
    assert engine.scheduler.num_preemptions > 0
    for i in (0, 1):
        assert finished[f"greedy{i}"] == GREEDY_IDS[i]
    result = engine.take_beam_search_outputs()["eos"]
    assert [s.tokens for s in result.sequences] == [
        GOLDEN[f"eos_ids_{r}"].tolist() for r in range(width)]
    np.testing.assert_allclose([s.cum_logprob for s in result.sequences], GOLDEN["eos_cum"],
                               atol=2e-4)
    assert [s.finish_reason for s in result.sequences] == [
        "stop" if f else "length" for f in GOLDEN["eos_finished"]]
    assert [s.stop_reason for s in result.sequences] == [
        eos if f else None for f in GOLDEN["eos_finished"]]
    assert all(s.text is None for s in result.sequences)  # no tokenizer
    manager = engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks - 1


@pytest.mark.slow
def test_one_block_copy_call_per_step(llm):
    """Concurrent groups fork in the same step: their copy-on-write copies go to the device in
    one batched call per step, and the results equal a run of each prompt alone."""
    engine = llm.llm_engine
    copier, calls = engine._block_copier, []

    def counting(kv_cache, copies):
        calls.append((engine.runner.timings.steps, len(copies)))
        return copier(kv_cache, copies)
    engine._block_copier = counting
    params = BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True)
    try:
        together = llm.beam_search(PROMPTS[:2], params)
    finally:
        engine._block_copier = copier
    steps = [step for step, _ in calls]
    assert calls and len(steps) == len(set(steps))
    assert max(n for _, n in calls) > 1  # the two groups' copies of a step, batched
    alone = [llm.beam_search([prompt], params)[0] for prompt in PROMPTS[:2]]
    assert [[s.tokens for s in o.sequences] for o in together] == [
        [s.tokens for s in o.sequences] for o in alone]


@pytest.mark.slow
def test_pipelined_and_synchronous_steps_agree(llm, tiny_checkpoint):
    """Async scheduling pipelines beam steps (``LLMEngine._step_beams``: the rest of a step is
    applied while the next one runs) next to a greedy request; without it every step is applied
    before the next: both give the same beams and the same greedy tokens."""
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(engine):
        engine.add_request("greedy", None, greedy, prompt_token_ids=PROMPTS[2]["prompt_token_ids"])
        for i in (0, 1):
            engine.add_beam_search(f"b{i}", None, params,
                                   prompt_token_ids=PROMPTS[i]["prompt_token_ids"])
        tokens, results = None, {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    tokens = output.outputs[0].token_ids
            results.update(engine.take_beam_search_outputs())
        return tokens, {k: [(s.tokens, s.cum_logprob) for s in v.sequences]
                        for k, v in results.items()}

    assert llm.llm_engine.config.async_scheduling
    pipelined = run(llm.llm_engine)
    synchronous = run(make_llm(tiny_checkpoint, async_scheduling=False).llm_engine)
    assert pipelined[0] == synchronous[0] == GREEDY_IDS[2][:12]
    assert set(pipelined[1]) == set(synchronous[1]) == {"b0", "b1"}
    for group, beams in pipelined[1].items():
        assert [t for t, _ in beams] == [t for t, _ in synchronous[1][group]]
        np.testing.assert_allclose([c for _, c in beams], [c for _, c in synchronous[1][group]],
                                   atol=1e-4)


def test_bad_requests_are_refused(llm):
    engine = llm.llm_engine
    prompt = PROMPTS[0]["prompt_token_ids"]
    with pytest.raises(ValueError, match="beam_width"):
        engine.add_beam_search("w", None, BeamSearchParams(5, 4), prompt_token_ids=prompt)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_beam_search("l", None, BeamSearchParams(2, 200), prompt_token_ids=prompt)
    with pytest.raises(ValueError, match="lora_request"):
        llm.beam_search([PROMPTS[0]], BeamSearchParams(2, 4), lora_request="x")
    assert not engine.has_unfinished_requests()


def test_preempting_a_beam_preempts_its_group():
    """The scheduler alone: beams of one group (``beam_group_id``) are preempted together when
    a later request needs their blocks, and a waiting first beam holds the group's seats."""
    from engine_testing import create_requests, create_scheduler

    scheduler = create_scheduler(num_blocks=9, block_size=4, max_num_seqs=4,
                                 max_num_batched_tokens=64, max_model_len=32)
    beams = create_requests(3, 6, id_prefix="b")
    other = create_requests(1, 6, id_prefix="o")[0]
    for beam in beams:
        beam.beam_group_id = "g"
    beams[0].beam_seats = 3
    scheduler.add_request(beams[0])
    scheduler.add_request(other)
    scheduler.add_request(create_requests(1, 6, id_prefix="x")[0])
    first = scheduler.schedule()
    # the first beam holds 3 of the 4 seats: only one more request is admitted
    assert [s.req_id for s in first.scheduled] == ["b0", "o0"]
    for beam in beams[1:]:  # as a fork would add them: running, with blocks of their own
        scheduler.add_request(beam)
        scheduler.waiting.remove(beam)
        scheduler.block_manager.allocate_slots(beam, 6)
        beam.status, beam.num_computed_tokens = RequestStatus.RUNNING, 6
        scheduler.running.insert(0, beam)
    beams[0].beam_seats = 0
    # running [b2, b1, b0, o0] hold all 8 blocks; each needs a third one: b2 and b1 get the
    # blocks of o0 (the fcfs tail), then b0 must preempt itself, and its whole group goes
    for request in scheduler.running:
        request.append_output_token_ids([11, 12, 13])
    out = scheduler.schedule()
    assert out.preempted_req_ids == {"o0", "b0", "b1", "b2"}
    assert all(b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
               and not scheduler.block_manager.get_block_ids(b.request_id) for b in beams)
    assert not {s.req_id for s in out.scheduled} & {"b0", "b1", "b2"}
