"""Where a GPU program's time goes: trace a callable with the JAX profiler, then sum the kernels.

    with_kernel_table(lambda: run_steps(10), steps=10) -> str

The trace is read back with ``jax.profiler.ProfileData`` (no TensorBoard needed). For each GPU
stream line the kernels' durations are summed by name; the table shows, per step, the busy time of
the GPU (sum of kernel durations), the span from the first kernel's start to the last one's end,
and the kernels by total time. span - busy is time the GPU sat idle between kernels: launch gaps
and waiting for the host.

``device_activity`` reads a trace of a window of engine steps: the GPU's busy time (the union of
its kernels' intervals over all streams, so overlapping kernels count once) and its span; the
rest of the span is time the GPU had nothing to run, which between steps is time it waited for
the host. ``idle_by_host_phase`` says what the host was doing meanwhile: the engine marks the
phases of a step on the profiler's host timeline (``jaxpaged.utils.host_phase``), and each idle
gap is charged to the phases open during it, as a path from the outermost (``step/apply``).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import tempfile
from collections.abc import Callable, Iterable

import jax
from jax.profiler import ProfileData

from jaxpaged.utils.host_phase import PHASE_PREFIX

OUTSIDE = "(outside the engine step)"  # idle while no host phase was open
# Idle gaps by length, ns: launch gaps between kernels of one queued program are short; the
# device waiting for the host to queue more is longer.
GAP_BUCKETS_NS = ((10e3, "< 10 us"), (100e3, "10-100 us"), (1e6, "0.1-1 ms"),
                  (float("inf"), ">= 1 ms"))


def with_kernel_table(run: Callable[[], object], steps: int, top: int = 40) -> str:
    """Runs ``run()`` (which must block until its device work is done) under the profiler and
    returns the per-step kernel table, then the idle table (``IdleReport.table``)."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            run()
        profile = _read_trace(directory)
        if profile is None:
            return "no trace written"
        idle = idle_report(profile)
        table = kernel_table(profile, steps, top)
        return table if idle is None else f"{table}\n\n{idle.table(steps)}"


@dataclasses.dataclass(frozen=True)
class DeviceActivity:
    busy_ns: float  # some kernel running
    span_ns: float  # first kernel's start to last kernel's end
    kernels: int

    @property
    def idle_ns(self) -> float:
        return self.span_ns - self.busy_ns


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def gpu_kernel_intervals(profile: ProfileData) -> list[tuple[float, float]]:
    """(start, end) ns of every kernel on the GPU stream lines of a trace."""
    return [(event.start_ns, event.start_ns + event.duration_ns)
            for plane in profile.planes if plane.name.startswith("/device:GPU")
            for line in plane.lines if "stream" in line.name.lower()
            for event in line.events]


def host_phase_events(profile: ProfileData) -> list[tuple[float, float, str]]:
    """(start, end, phase) ns of the engine's host phases in a trace."""
    return [(event.start_ns, event.start_ns + event.duration_ns, event.name[len(PHASE_PREFIX):])
            for plane in profile.planes if plane.name.startswith("/host:")
            for line in plane.lines
            for event in line.events if event.name.startswith(PHASE_PREFIX)]


def _read_trace(directory: str) -> ProfileData | None:
    files = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    return ProfileData.from_file(files[0]) if files else None




def idle_gaps(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (start, end) gaps between the union of intervals, within their span, in order."""
    gaps, reach = [], None
    for start, end in sorted(intervals):
        if reach is not None and start > reach:
            gaps.append((reach, start))
        reach = end if reach is None else max(reach, end)
    return gaps


def idle_by_host_phase(gaps: list[tuple[float, float]],
                       phases: list[tuple[float, float, str]]) -> dict[str, float]:
    """ns of the gaps (sorted, disjoint) by the host phases open during them: a phase path
    "outer/inner" (phases of one thread nest), or ``OUTSIDE`` where none was open."""
    phases = sorted(phases, key=lambda p: (p[0], -p[1]))  # outer first on equal starts
    starts = [start for start, _, _ in phases]
    charged: dict[str, float] = collections.defaultdict(float)
    open_, added = [], 0  # phases that may overlap the gap; how many were looked at
    for gap_start, gap_end in gaps:
        reach = bisect.bisect_left(starts, gap_end)
        open_ += phases[added:reach]
        added = max(added, reach)
        open_ = [p for p in open_ if p[1] > gap_start]  # later gaps start later still
        cuts = sorted({gap_start, gap_end}
                      | {t for p in open_ for t in p[:2] if gap_start < t < gap_end})
        for left, right in zip(cuts, cuts[1:]):
            path = "/".join(name for start, end, name in open_ if start <= left and end >= right)
            charged[path or OUTSIDE] += right - left
    return dict(charged)


@dataclasses.dataclass(frozen=True)
class IdleReport:
    """Where the GPU's idle time of a traced window went: by the host phase open meanwhile
    (ns) and by gap length (count, ns)."""
    by_phase: dict[str, float]
    by_length: dict[str, tuple[int, float]]

    def per_step_ms(self, steps: int) -> dict[str, float]:
        """The phases' idle in ms per step, largest first."""
        return {path: ns / 1e6 / max(steps, 1)
                for path, ns in sorted(self.by_phase.items(), key=lambda kv: -kv[1])}

    def table(self, steps: int) -> str:
        lines = [f"{'idle us/step':>13}  host phase open meanwhile"]
        lines += [f"{ms * 1e3:13.1f}  {path}" for path, ms in self.per_step_ms(steps).items()]
        lines.append(f"{'gaps/step':>13}  {'idle us/step':>12}  gap length")
        lines += [f"{count / max(steps, 1):13.1f}  {ns / 1e3 / max(steps, 1):12.1f}  {label}"
                  for label, (count, ns) in self.by_length.items()]
        return "\n".join(lines)


def idle_report(profile: ProfileData) -> IdleReport | None:
    """The idle report of a trace; None without GPU kernels."""
    intervals = gpu_kernel_intervals(profile)
    if not intervals:
        return None
    gaps = idle_gaps(intervals)
    by_length: dict[str, tuple[int, float]] = {label: (0, 0.0) for _, label in GAP_BUCKETS_NS}
    for start, end in gaps:
        label = next(label for bound, label in GAP_BUCKETS_NS if end - start < bound)
        count, total = by_length[label]
        by_length[label] = (count + 1, total + end - start)
    return IdleReport(idle_by_host_phase(gaps, host_phase_events(profile)), by_length)


def device_activity(profile: ProfileData) -> DeviceActivity | None:
    """The GPU's activity in a trace; None without GPU kernels."""
    intervals = gpu_kernel_intervals(profile)
    if not intervals:
        return None
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    return DeviceActivity(busy_time(intervals), span, len(intervals))


def read_activity(directory: str) -> tuple[DeviceActivity | None, IdleReport | None]:
    """``device_activity`` and ``idle_report`` of the trace written to ``directory`` (read
    once); (None, None) without a trace or GPU kernels."""
    profile = _read_trace(directory)
    if profile is None:
        return None, None
    return device_activity(profile), idle_report(profile)


def kernel_table(profile: ProfileData, steps: int, top: int = 40) -> str:
    totals: dict[str, float] = collections.defaultdict(float)  # name -> ns
    counts: dict[str, int] = collections.Counter()
    first, last, busy = float("inf"), 0.0, 0.0
    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns
                counts[event.name] += 1
                busy += event.duration_ns
                first = min(first, event.start_ns)
                last = max(last, event.start_ns + event.duration_ns)
    if not totals:
        return "no GPU kernels in the trace"
    span = last - first
    lines = [f"per step: GPU busy {busy / steps / 1e3:.1f} us, span {span / steps / 1e3:.1f} us, "
             f"idle {(span - busy) / steps / 1e3:.1f} us, "
             f"{sum(counts.values()) / steps:.0f} kernels",
             f"{'us/step':>9} {'n/step':>7}  kernel"]
    for name, total in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{total / steps / 1e3:9.1f} {counts[name] / steps:7.1f}  {name[:110]}")
    return "\n".join(lines)
