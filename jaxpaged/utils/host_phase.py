"""The host phases of an engine step, marked for the JAX profiler.

``host_phase("schedule")`` is a ``jax.profiler.TraceAnnotation`` named ``jaxpaged.schedule``. It
costs a fraction of a microsecond when no trace is being taken; in a trace it says what the host
was doing at each moment, so the time the device sat idle can be charged to a phase of the step
(``bench/gpu_trace.py``'s ``idle_by_host_phase``). Phases nest (``step`` holds the others; the
grammar bitmask may apply the previous step's tokens inside ``grammar``).
"""

from __future__ import annotations

import jax

PHASE_PREFIX = "jaxpaged."
PHASES = (
    "step",      # LLMEngine.step, outside the phases below
    "schedule",  # the scheduler picks the step's requests
    "pack",      # the step's inputs packed into host arrays
    "model",     # the model step queued on the device
    "grammar",   # structured outputs' bitmask filled (the previous step applied first)
    "sample",    # sampling tensors built and the sampler queued
    "wait",      # the host waits for a step's sampled tokens
    "apply",     # sampled tokens applied: stops, outputs, detokenization
    "beams",     # beam search's survivors chosen and forked
)


def host_phase(name: str) -> jax.profiler.TraceAnnotation:
    """A context manager marking ``name`` (one of ``PHASES``) on the profiler's host timeline."""
    if name not in PHASES:
        raise ValueError(f"host phase must be one of {PHASES}, got {name!r}")
    return jax.profiler.TraceAnnotation(PHASE_PREFIX + name)
