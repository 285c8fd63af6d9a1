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
the host.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import tempfile
from collections.abc import Callable, Iterable

import jax
from jax.profiler import ProfileData


def with_kernel_table(run: Callable[[], object], steps: int, top: int = 40) -> str:
    """Runs ``run()`` (which must block until its device work is done) under the profiler and
    returns the per-step kernel table."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            run()
        files = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
        if not files:
            return "no trace written"
        return kernel_table(ProfileData.from_file(files[0]), steps, top)


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


def device_activity(directory: str) -> DeviceActivity | None:
    """The GPU's activity in the trace written to ``directory``; None without GPU kernels."""
    files = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    intervals = gpu_kernel_intervals(ProfileData.from_file(files[0])) if files else []
    if not intervals:
        return None
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    return DeviceActivity(busy_time(intervals), span, len(intervals))


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
