"""Typed objects crossing the scheduler's boundary (vLLM v1's ``vllm/v1/core/sched/output.py``).

``SchedulerOutput`` is all the runner reads: which requests run this step, which tokens to feed,
where their K/V live. We are single-process, so every step carries full block tables instead of
vLLM's diff protocol. ``RequestUpdate`` is what ``Scheduler.update_from_output`` hands back.

NOTE: ``ScheduledRequest`` and ``RequestUpdate`` are made once per request per step, so they are
typed ``NamedTuple``s: immutable like a frozen dataclass, but built several times faster (a frozen
dataclass sets each field through ``object.__setattr__``). The scheduler's per-step loops build
them as ``tuple.__new__(ScheduledRequest, (every field, in order))``, which also skips the
NamedTuple's Python-level ``__new__``: a new field must be added there too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

from jaxpaged.core.request import Request
from jaxpaged.sampling_params import SamplingParams


class ScheduledRequest(NamedTuple):
    """One request's share of a step. Its new tokens sit at positions
    ``num_computed_tokens .. num_computed_tokens + num_new_tokens - 1``."""

    req_id: str
    # [num_new_tokens] ids to feed: a prompt chunk, recomputed output tokens, or the last sample;
    # async scheduling: -1 for the token the previous (in-flight) step samples, filled on device.
    token_ids: list[int]
    # Tokens already in the KV cache before this step (= the position of token_ids[0]).
    num_computed_tokens: int
    # The request's whole block table (no null padding); covers every position up to the last new
    # token, so slot of position p = block_ids[p // block_size] * block_size + p % block_size.
    block_ids: list[int]
    # True when this step computes the request's last known token, so the runner must sample its
    # next token: every decode step and the last chunk of a prefill. False for a prefill chunk that
    # leaves tokens uncomputed (and for an n > 1 parent's shared prefix): no token comes back.
    do_sample: bool
    sampling_params: SamplingParams
    # The Request's own lists (for penalties and seeded generators), not copies: read them before
    # update_from_output appends this step's sample, and never mutate them.
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Positions among this step's new tokens whose next-token distribution gives a prompt logprob
    # still owed to the request (position p -> prompt token p + 1). Empty unless the request
    # asked for prompt_logprobs; never a position already reported (recompute after preemption).
    prompt_logprobs_positions: range = range(0)
    # Output tokens generated before this step's sample, placeholders of the step in flight
    # included (output_token_ids may still lack those): seeded streams and min_tokens count them.
    num_output_tokens: int = 0

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length after the step (cached + new)."""
        return self.num_computed_tokens + len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """Everything the runner needs for one step."""

    # Batch order: running requests first (decodes and continued prefills), then new admissions.
    scheduled: list[ScheduledRequest]
    # Sum of num_new_tokens over `scheduled`; never above max_num_batched_tokens.
    total_num_scheduled_tokens: int
    # Requests that finished, were aborted or were forked since the previous step: drop their state.
    finished_req_ids: set[str]
    # Requests preempted while building this step: their blocks were freed; they recompute later.
    preempted_req_ids: set[str]

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        """req_id -> num_new_tokens (vLLM's field of that name)."""
        return {s.req_id: len(s.token_ids) for s in self.scheduled}

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def max_query_len(self) -> int:
        """Largest num_new_tokens in the batch; 1 means decode only."""
        return max([len(s.token_ids) for s in self.scheduled], default=0)  # read every step


class RequestUpdate(NamedTuple):
    """What one step did to one request (a sampled request, after stop checks)."""

    request: Request  # its output_token_ids already end with new_token_ids
    new_token_ids: list[int]  # tokens appended this step (cut after a stop token)
    finished: bool  # True if this step finished it (see request.get_finished_reason())


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics (Prometheus gauges and counters)."""

    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float  # fraction of allocatable KV blocks in use, 0..1
    num_preemptions: int  # total since start
    prefix_cache_queries: int  # tokens of admitted requests looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens served from the cache
