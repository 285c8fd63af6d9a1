"""Async scheduling with structured outputs: steps with grammar rows are pipelined (step k + 1 is
scheduled and packed before step k - 1's tokens are awaited; sampler k and model k + 1 are then
launched back to back), with the same outputs as the synchronous engine."""

from __future__ import annotations

import re

import pytest

from llm_testing import make_llm
from jaxpaged import SamplingParams, StructuredOutputsParams

REGEX = r"[a-c]{2,6}-\d{2,4}"
CHOICES = ["yes", "no", "maybe not"]


def constrained(seed: int, **constraint) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=24,
                          structured_outputs=StructuredOutputsParams(**constraint))


def mixed_params() -> list[SamplingParams]:
    """Grammar rows among plain, penalised, stopped and n > 1 rows."""
    return [constrained(1, regex=REGEX), SamplingParams(temperature=0.0, max_tokens=20,
                                                        ignore_eos=True),
            constrained(2, regex=REGEX), SamplingParams(temperature=0.8, seed=3, max_tokens=16,
                                                        ignore_eos=True),
            constrained(4, choice=CHOICES),
            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                           repetition_penalty=1.3),
            SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True,
                           structured_outputs=StructuredOutputsParams(regex=REGEX))]


PROMPTS = ["Go", "Once upon", "A", "Hello there", "Pick", "The", "Codes"]


@pytest.fixture(scope="module")
def async_llm(tiny_checkpoint):
    return make_llm(tiny_checkpoint, max_model_len=256, max_num_seqs=8,
                    max_num_batched_tokens=64)


class LaunchRecorder:
    """The order of the engine's scheduling, packing, launches and fetches."""

    def __init__(self, engine, monkeypatch):
        self.events: list[str] = []
        runner, scheduler = engine.runner, engine.scheduler
        for owner, name, kind in ((scheduler, "schedule", "schedule"), (runner, "pack", "pack"),
                                  (runner, "launch_model", "model"), (runner, "fetch", "fetch")):
            monkeypatch.setattr(owner, name, self._recording(getattr(owner, name), kind))
        launch_sampler = runner.launch_sampler

        def recording_sampler(staged, grammar_bitmask=None):
            self.events.append("sampler+mask" if grammar_bitmask is not None else "sampler")
            return launch_sampler(staged, grammar_bitmask)
        monkeypatch.setattr(runner, "launch_sampler", recording_sampler)

    def _recording(self, method, kind: str):
        def recorded(*args, **kwargs):
            self.events.append(kind)
            return method(*args, **kwargs)
        return recorded


def test_sampler_and_next_model_launch_back_to_back(async_llm, monkeypatch):
    engine = async_llm.llm_engine
    params = [constrained(s, regex=REGEX) for s in range(3)] + [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    async_llm.generate(PROMPTS[:4], params, use_tqdm=False)  # grammars compile
    recorder = LaunchRecorder(engine, monkeypatch)
    outputs = async_llm.generate(PROMPTS[:4], params, use_tqdm=False)
    assert all(re.fullmatch(REGEX, o.outputs[0].text) for o in outputs[:3])
    events = recorder.events
    masked = [i for i, e in enumerate(events) if e == "sampler+mask"]
    assert len(masked) >= 5
    pipelined = 0
    for i in masked:
        following = events[i + 1:i + 2]
        if "model" not in events[i + 1:]:
            continue
        # nothing between a grammar step's sampler and the next model launch
        assert following == ["model"], events[i - 4:i + 4]
        # the next step was scheduled and packed before the wait for the previous tokens
        before = events[max(0, i - 3):i]
        pipelined += before == ["schedule", "pack", "fetch"]
    assert pipelined >= len(masked) - 3


def test_outputs_equal_the_synchronous_engine(tiny_checkpoint, async_llm):
    sync = make_llm(tiny_checkpoint, max_model_len=256, max_num_seqs=8,
                    max_num_batched_tokens=64, async_scheduling=False)
    params = mixed_params()
    got = async_llm.generate(PROMPTS, params, use_tqdm=False)
    want = sync.generate(PROMPTS, params, use_tqdm=False)
    assert ([[c.token_ids for c in o.outputs] for o in got]
            == [[c.token_ids for c in o.outputs] for o in want])
    assert [[c.finish_reason for c in o.outputs] for o in got] == [
        [c.finish_reason for c in o.outputs] for o in want]
    assert re.fullmatch(REGEX, got[0].outputs[0].text)
    assert got[4].outputs[0].text in CHOICES
    engine = async_llm.llm_engine
    assert engine.num_steps_in_flight() == 0 and not engine.structured._rows


def test_small_token_budget_keeps_outputs_equal(tiny_checkpoint):
    """A budget smaller than the batch makes requests sit out steps while two are in flight:
    a pending token from an older step is applied before the request is scheduled again."""
    small = make_llm(tiny_checkpoint, max_model_len=256, max_num_seqs=4,
                     max_num_batched_tokens=6, enable_chunked_prefill=True)
    sync = make_llm(tiny_checkpoint, max_model_len=256, max_num_seqs=4,
                    max_num_batched_tokens=6, enable_chunked_prefill=True,
                    async_scheduling=False)
    params = mixed_params()
    prompts = [" ".join([p] * 5) for p in PROMPTS]  # prefill chunks take the budget
    scheduler, skipped = small.llm_engine.scheduler, []
    schedule = scheduler.schedule

    def recording_schedule():
        waiting = [r.request_id for r in scheduler.running if r.num_output_placeholders]
        out = schedule()
        scheduled = {s.req_id for s in out.scheduled}
        skipped.extend(i for i in waiting if i not in scheduled)
        return out
    scheduler.schedule = recording_schedule
    got = small.generate(prompts, params, use_tqdm=False)
    want = sync.generate(prompts, params, use_tqdm=False)
    assert skipped  # some pending tokens came from an older step
    assert ([[c.token_ids for c in o.outputs] for o in got]
            == [[c.token_ids for c in o.outputs] for o in want])


def test_abort_while_a_grammar_step_is_staged(async_llm):
    engine = async_llm.llm_engine
    for i in range(3):
        engine.add_request(f"staged-{i}", None, constrained(10 + i, regex=REGEX),
                           prompt_token_ids=[5 + i, 6, 7])
    for _ in range(4):
        engine.step()
    assert engine._staged is not None  # a grammar step's sampler waits for the next call
    engine.abort_request(["staged-0", "staged-1"])
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert set(finished) == {"staged-2"}
    assert re.fullmatch(REGEX, finished["staged-2"].outputs[0].text)
    assert not engine.structured._rows  # the aborted rows' grammars were not re-created
    manager = engine.scheduler.block_manager
    assert manager.num_free_blocks == engine.kv_plan.num_blocks - 1
