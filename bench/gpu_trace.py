"""Where a GPU program's time goes: trace a callable with the JAX profiler, then sum the kernels.

    with_kernel_table(lambda: run_steps(10), steps=10) -> str

The trace is read back with ``jax.profiler.ProfileData`` (no TensorBoard needed). For each GPU
stream line the kernels' durations are summed by name; the table shows, per step, the busy time of
the GPU (sum of kernel durations), the span from the first kernel's start to the last one's end,
and the kernels by total time. span - busy is time the GPU sat idle between kernels: launch gaps
and waiting for the host.
"""

from __future__ import annotations

import collections
import glob
import tempfile
from collections.abc import Callable

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
