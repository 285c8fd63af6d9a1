"""The scheduler's limits (vLLM's ``SchedulerConfig`` names) and its queue-full error."""

from __future__ import annotations

import dataclasses
from typing import Literal

SchedulingPolicy = Literal["fcfs", "priority"]


class QueueFullError(RuntimeError):
    """The waiting queue already holds ``max_waiting`` requests (the server answers 503)."""


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling limits (vLLM's ``SchedulerConfig`` names)."""

    max_model_len: int
    """Context length: prompt + output tokens of one sequence."""
    max_num_seqs: int = 256
    """Most sequences in one step (and in the running set)."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step, prefill chunks and decode tokens together."""
    enable_chunked_prefill: bool = True
    """Split long prompts over steps; when False a prompt is only scheduled whole."""
    block_size: int = 16
    """Token slots per KV block."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of identical prompt prefixes."""
    policy: SchedulingPolicy = "fcfs"
    """"fcfs": arrival order; "priority": lower ``Request.priority`` first, then arrival."""
    max_waiting: int | None = None
    """Most requests in the waiting queue; ``add_request`` raises QueueFullError beyond it."""
    async_scheduling: bool = False
    """A sampling step leaves an output placeholder, so the next step is scheduled before this
    one's token is known (see ``Scheduler.update_from_output``)."""

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.max_waiting is not None and (
            not isinstance(self.max_waiting, int) or self.max_waiting < 1
        ):
            raise ValueError(
                f"max_waiting must be None or a positive int, got {self.max_waiting!r}."
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                f"max_model_len={self.max_model_len}: without chunked prefill long prompts "
                "would never fit."
            )
