"""The step being built by ``Scheduler.schedule`` and its commit into ``ScheduledRequest``s.

``StepPlan`` collects (request, num_new_tokens) in batch order while the scheduler walks the running
and waiting requests (a preemption may drop an entry again). ``StepPlan.commit`` then turns each
entry into the runner's view and advances the request: ``num_computed_tokens`` moves past the new
tokens, a sampling step leaves an output placeholder (async scheduling) and owed prompt-logprob
positions are taken. It runs once per request per step, so it reads plain attributes only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jaxpaged.core.block_manager import BlockTable
from jaxpaged.core.request import Request
from jaxpaged.core.scheduler_output import ScheduledRequest

_new_tuple = tuple.__new__  # builds a NamedTuple from all its fields (see scheduler_output)
_NO_POSITIONS = range(0)  # ScheduledRequest.prompt_logprobs_positions of nearly every request


@dataclasses.dataclass
class StepPlan:
    """The step being built: (request, num_new_tokens) in batch order and what is left."""

    token_budget: int
    scheduled: list[tuple[Request, int]] = dataclasses.field(default_factory=list)
    preempted_req_ids: set[str] = dataclasses.field(default_factory=set)

    def add(self, request: Request, num_new_tokens: int) -> None:
        self.scheduled.append((request, num_new_tokens))
        self.token_budget -= num_new_tokens

    def drop(self, request: Request) -> None:
        for i, (scheduled, num_new_tokens) in enumerate(self.scheduled):
            if scheduled is request:
                del self.scheduled[i]
                self.token_budget += num_new_tokens
                return

    def commit(self, tables: Mapping[str, BlockTable], *, block_size: int,
               async_scheduling: bool) -> tuple[list[ScheduledRequest], list[Request]]:
        """Advance every planned request; returns their ``ScheduledRequest``s in batch order and
        the n > 1 parents whose shared prefix is now computed (to fork)."""
        scheduled: list[ScheduledRequest] = []
        parents: list[Request] = []
        for request, num_new_tokens in self.scheduled:
            start = request.num_computed_tokens
            end = start + num_new_tokens
            all_token_ids, placeholders = request.all_token_ids, request.num_output_placeholders
            known = len(all_token_ids)
            # -1: a sample of the step in flight (async), which the runner fills on the device
            if end <= known:
                token_ids = all_token_ids[start:end]
            elif start >= known:  # the async decode step
                token_ids = [-1] * num_new_tokens
            else:
                token_ids = all_token_ids[start:known] + [-1] * (end - known)
            do_sample = end == known + placeholders
            params, output_token_ids = request.sampling_params, request.output_token_ids
            table = tables.get(request.request_id)
            scheduled.append(_new_tuple(ScheduledRequest, (
                request.request_id, token_ids, start,
                table.block_ids if table is not None else [], do_sample, params,
                request.prompt_token_ids, output_token_ids,
                (_NO_POSITIONS if params.prompt_logprobs is None
                 else request.take_prompt_logprob_positions(start, end)),
                len(output_token_ids) + placeholders)))
            request.num_computed_tokens = end
            if do_sample and async_scheduling:
                request.num_output_placeholders = placeholders + 1
            if params.n > 1 and end == request.shared_prefix_len(block_size):
                parents.append(request)
        return scheduled, parents
