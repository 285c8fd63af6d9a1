"""Charging the device's idle time to the engine's host phases (bench/gpu_trace.py): the gap
arithmetic on hand-made timelines, and the phases the engine really marks in a profiler trace."""

import glob
import pathlib
import sys
import types

import jax
import pytest

from jaxpaged import SamplingParams, StructuredOutputsParams
from jaxpaged.sampling_params import BeamSearchParams
from jaxpaged.utils.host_phase import PHASES, host_phase
from llm_testing import make_llm

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gpu_trace import (OUTSIDE, host_phase_events, idle_by_host_phase, idle_gaps,  # noqa: E402
                       idle_report)


def test_idle_gaps_are_the_holes_in_the_union_of_kernels():
    assert idle_gaps([]) == []
    assert idle_gaps([(0, 10)]) == []
    assert idle_gaps([(30, 40), (0, 10), (5, 20), (41, 50)]) == [(20, 30), (40, 41)]
    assert idle_gaps([(0, 10), (10, 12)]) == []  # back to back: no gap


def test_a_gap_is_charged_to_the_innermost_phases_open_meanwhile():
    phases = [(0, 100, "step"), (12, 25, "schedule"), (25, 35, "model"), (40, 45, "wait")]
    charged = idle_by_host_phase([(20, 30), (38, 39), (40, 41)], phases)
    assert charged == {"step/schedule": 5, "step/model": 5, "step": 1, "step/wait": 1}
    # a gap that outlasts the step, and one before anything was marked
    assert idle_by_host_phase([(-10, -5), (95, 110)], phases) == {OUTSIDE: 15, "step": 5}


def test_phases_starting_together_nest_the_longer_outside():
    phases = [(0, 10, "apply"), (0, 50, "step")]
    assert idle_by_host_phase([(2, 4), (20, 30)], phases) == {"step/apply": 2, "step": 10}


def _event(start, duration, name):
    return types.SimpleNamespace(start_ns=start, duration_ns=duration, name=name)


def _plane(name, lines):
    return types.SimpleNamespace(name=name, lines=[types.SimpleNamespace(name=line, events=events)
                                                   for line, events in lines.items()])


def test_idle_report_reads_kernels_and_phases_from_a_trace():
    kernels = [_event(0, 5_000, "gemm"), _event(6_000, 4_000, "attn"),  # 1 us launch gap
               _event(60_000, 10_000, "gemm"),  # 50 us: the host was scheduling
               _event(2_070_000, 1_000, "sample")]  # 2 ms: waiting outside any step
    profile = types.SimpleNamespace(planes=[
        _plane("/device:GPU:0", {"Stream #13": kernels, "XLA Ops": [_event(0, 9e9, "op")]}),
        _plane("/host:CPU", {"python": [_event(4_000, 60_000, "jaxpaged.step"),
                                        _event(10_000, 50_000, "jaxpaged.schedule"),
                                        _event(10_000, 50, "unrelated")]})])
    report = idle_report(profile)
    assert report.by_phase == {"step": 1_000, "step/schedule": 50_000, OUTSIDE: 2_000_000}
    assert report.by_length["< 10 us"] == (1, 1_000)
    assert report.by_length["10-100 us"] == (1, 50_000)
    assert report.by_length[">= 1 ms"] == (1, 2_000_000)
    assert list(report.per_step_ms(2)) == [OUTSIDE, "step/schedule", "step"]  # largest first
    assert report.per_step_ms(2)[OUTSIDE] == pytest.approx(1.0)
    assert "step/schedule" in report.table(2)
    empty = types.SimpleNamespace(planes=[_plane("/host:CPU", {})])
    assert idle_report(empty) is None


def test_host_phase_names_are_checked():
    with pytest.raises(ValueError, match="host phase"):
        host_phase("schedulee")


def _phases_of(run, tmp_path) -> list[tuple[float, float, str]]:
    from jax.profiler import ProfileData

    with jax.profiler.trace(str(tmp_path)):
        run()
    (path,) = glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)
    return host_phase_events(ProfileData.from_file(path))


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1]


@pytest.mark.slow
def test_the_engine_marks_every_phase_of_its_steps(tiny_checkpoint, tmp_path):
    llm = make_llm(tiny_checkpoint)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    choice = SamplingParams(temperature=0.0, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9, 10, 11]}]

    def run():
        llm.generate(prompts, [greedy, choice], use_tqdm=False)
        llm.beam_search(prompts[:1], BeamSearchParams(beam_width=2, max_tokens=3))
    events = _phases_of(run, tmp_path / "trace")
    names = {name for _, _, name in events}
    assert names == set(PHASES)
    steps = [e for e in events if e[2] == "step"]
    for event in events:  # every phase runs inside an engine step
        assert any(_inside(event, step) for step in steps), event
    schedules = [e for e in events if e[2] == "schedule"]
    assert len(steps) >= len(schedules) >= 4
