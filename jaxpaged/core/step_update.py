"""The stateless half of ``Scheduler.update_from_output``: reading the runner's sampled ids and
deciding whether a request's last token ends it (vLLM's stop rules)."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

from jaxpaged.core.request import Request, RequestStatus
from jaxpaged.core.scheduler_output import SchedulerOutput

# Sampled ids from the runner: req_id -> ids, or one row per scheduled request in batch order.
SampledTokenIds = Mapping[str, Sequence[int] | int] | Sequence[Sequence[int] | int]
StopDecision = tuple[RequestStatus, int | None]  # (finished status, stop_reason)


def sampled_by_request_id(output: SchedulerOutput,
                          sampled: SampledTokenIds) -> Mapping[str, object]:
    """``sampled`` as req_id -> ids (rows are matched with ``output.scheduled`` in order)."""
    if isinstance(sampled, dict):  # the runner's own type: skips the slower ABC check
        return sampled
    if isinstance(sampled, Mapping):
        return sampled
    if len(sampled) != len(output.scheduled):
        raise ValueError(
            f"sampled_token_ids has {len(sampled)} rows for {len(output.scheduled)} "
            "scheduled requests."
        )
    return {s.req_id: row for s, row in zip(output.scheduled, sampled)}


def as_ids(token_ids: object) -> list[int]:
    """One id or a sequence/array of ids -> a list of Python ints."""
    if type(token_ids) is int:  # the common case: one sampled id
        return [token_ids]
    if type(token_ids) is list:  # never an index itself
        return [operator.index(t) for t in token_ids]
    try:
        return [operator.index(token_ids)]
    except TypeError:
        return [operator.index(t) for t in token_ids]


def check_stop(request: Request, max_model_len: int) -> StopDecision | None:
    """(finished status, stop_reason) if the request's last token ends it, as vLLM decides:
    a length cap first, then (past ``min_tokens``) EOS unless ignored, then a stop token id."""
    params, output_token_ids = request.sampling_params, request.output_token_ids
    num_output_tokens = len(output_token_ids)
    max_tokens = params.max_tokens
    if len(request.all_token_ids) >= max_model_len or (
        max_tokens is not None and num_output_tokens >= max_tokens
    ):
        return RequestStatus.FINISHED_LENGTH_CAPPED, None
    if num_output_tokens < params.min_tokens:
        return None
    last_token_id = output_token_ids[-1]
    if last_token_id == request.eos_token_id and not params.ignore_eos:
        return RequestStatus.FINISHED_STOPPED, None
    if last_token_id in params.stop_token_ids:
        return RequestStatus.FINISHED_STOPPED, last_token_id
    return None
