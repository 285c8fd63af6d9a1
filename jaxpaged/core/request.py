"""One generation request as the scheduler sees it (vLLM v1's ``Request``).

The scheduler is phase-free: a request only knows how many of its tokens are in the KV cache
(``num_computed_tokens``) and how many tokens it has (``num_tokens`` = prompt + output). Prefill,
chunked prefill, recompute after preemption and decode are all "compute the tokens from
``num_computed_tokens`` to ``num_tokens``". The request's KV blocks belong to the block manager
(``BlockManager.get_block_ids(request_id)``), not to the request.

Parallel sampling (``n > 1``): the request is a *parent* that computes the shared part of the prompt
and is then forked into ``n`` children (``f"{request_id}-{i}"``, ``parent_id`` set, ``n = 1``) that
generate independently; see ``Scheduler`` for the block-sharing rule.

The waiting queues (``FCFSRequestQueue``, ``PriorityRequestQueue``) live here too: both offer
``add`` (a new request), ``prepend`` (a preempted one), ``peek``, ``pop``, ``remove`` and
``remove_requests`` (many at once, one pass).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
import operator
import time
from collections.abc import Iterable, Iterator

from jaxpaged.outputs import FinishReason
from jaxpaged.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Every value above ``PREEMPTED`` is a finished state."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def get_finished_reason(status: RequestStatus) -> FinishReason | None:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt, its sampling parameters and the scheduler's progress on it."""

    request_id: str  # unique among live requests
    prompt_token_ids: list[int]  # [num_prompt_tokens]
    sampling_params: SamplingParams
    arrival_time: float | None = None  # seconds since the epoch; None = now
    priority: int = 0  # "priority" policy: lower values are scheduled first
    eos_token_id: int | None = None  # the tokenizer's EOS; ends the request unless ignore_eos
    parent_id: str | None = None  # set on the children of an n > 1 request
    sample_index: int = 0  # which of the parent's n samples this is (CompletionOutput.index)
    cache_salt: str | None = None  # prefix-cache blocks are shared only under the same salt

    status: RequestStatus = dataclasses.field(default=RequestStatus.WAITING, init=False)
    output_token_ids: list[int] = dataclasses.field(default_factory=list, init=False)
    # Tokens whose K/V are in the cache (or being written by the step in flight).
    num_computed_tokens: int = dataclasses.field(default=0, init=False)
    # Prompt tokens served by the prefix cache at the first admission (RequestOutput's).
    num_cached_tokens: int = dataclasses.field(default=0, init=False)
    num_preemptions: int = dataclasses.field(default=0, init=False)
    # prompt_logprobs requests: positions 0 .. this - 1 were scheduled to yield prompt logprobs
    # (prompt tokens 1 .. this); kept across preemption so recomputation reports nothing twice.
    num_prompt_logprob_positions: int = dataclasses.field(default=0, init=False)
    stop_reason: int | str | None = dataclasses.field(default=None, init=False)
    # Async scheduling: tokens sampled by a step still in flight, not yet in output_token_ids (the
    # next step already computes them, fed on the device); update_from_output resolves them.
    num_output_placeholders: int = dataclasses.field(default=0, init=False)
    # The first beam of a beam search group holds seats (max_num_seqs) for all of its beams
    # until the group forks (``jaxpaged.core.beam_group``); 0 otherwise.
    beam_seats: int = dataclasses.field(default=0, init=False)
    # The beam search group a beam belongs to (None for other requests): preempted together.
    beam_group_id: str | None = dataclasses.field(default=None, init=False)
    # Prompt then output token ids, kept as one list so slicing the next chunk costs no
    # concatenation. Read-only: append through ``append_output_token_ids``. (A plain attribute,
    # not a property: the scheduler reads it for every request every step.)
    all_token_ids: list[int] = dataclasses.field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty str, got {self.request_id!r}")
        if not isinstance(self.sampling_params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(self.sampling_params)!r}."
            )
        self.prompt_token_ids = _as_token_ids(self.prompt_token_ids, self.request_id)
        if not isinstance(self.priority, int):
            raise ValueError(f"priority must be an int, got {self.priority!r}")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str)
                                            or not self.cache_salt):
            raise ValueError(f"cache_salt must be a non-empty str or None, got {self.cache_salt!r}")
        if self.arrival_time is None:
            self.arrival_time = time.time()
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_seats(self) -> int:
        """Sequence slots (max_num_seqs) the request holds: n, or a beam group's width."""
        return max(self.sampling_params.n, self.beam_seats)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def append_output_token_id(self, token_id: int) -> None:
        """``append_output_token_ids`` of a single id (the per-step hot path)."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    @property
    def max_prefix_cache_tokens(self) -> int:
        """Most leading tokens a prefix-cache hit may cover. Cached tokens are not recomputed, so
        a request still owed prompt logprobs may only reuse positions already reported (vLLM
        skips the cache for such requests altogether). At least the last token is computed."""
        limit = self.num_tokens - 1
        reported = self.num_prompt_logprob_positions
        owed = (self.sampling_params.prompt_logprobs is not None
                and reported < self.num_prompt_tokens - 1)
        return min(limit, reported) if owed else limit

    def shared_prefix_len(self, block_size: int) -> int:
        """n > 1: the prompt tokens the parent computes before its fork, the last block boundary
        that leaves at least one prompt token to the children (see ``Scheduler``)."""
        return (self.num_prompt_tokens - 1) // block_size * block_size

    def take_prompt_logprob_positions(self, start: int, end: int) -> range:
        """Positions of ``start .. end - 1`` (about to be computed) whose prompt logprobs are still
        owed: at most up to the second-to-last prompt token (the last one predicts the first output
        token). Marks them as scheduled. Empty unless ``prompt_logprobs`` was asked for."""
        if self.sampling_params.prompt_logprobs is None:
            return range(0)
        first = max(start, self.num_prompt_logprob_positions)
        last = min(end, self.num_prompt_tokens - 1)
        if first >= last:
            return range(0)
        if first > self.num_prompt_logprob_positions:
            raise RuntimeError(f"request {self.request_id!r} skips prompt logprob positions "
                               f"{self.num_prompt_logprob_positions} .. {first - 1}")
        self.num_prompt_logprob_positions = last
        return range(first, last)

    def get_finished_reason(self) -> FinishReason | None:
        return RequestStatus.get_finished_reason(self.status)

    def make_child(self, index: int) -> Request:
        """The ``index``-th sample of an ``n > 1`` request: its own id, n = 1, seed + index.

        Shifting the seed (as vLLM does) keeps seeded children reproducible yet different. Only
        sample 0 keeps ``prompt_logprobs``: it computes (and reports) the tail of the prompt that
        the parent did not.
        """
        params = self.sampling_params.clone()
        params.n = 1
        if params.seed is not None:
            params.seed += index
        if index > 0:  # the prompt's logprobs are the same for every sample: sample 0 reports them
            params.prompt_logprobs = None
        child = Request(
            request_id=f"{self.request_id}-{index}",
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=params,
            arrival_time=self.arrival_time,
            priority=self.priority,
            eos_token_id=self.eos_token_id,
            parent_id=self.request_id,
            sample_index=index,
            cache_salt=self.cache_salt,
        )
        child.num_prompt_logprob_positions = self.num_prompt_logprob_positions
        return child


class FCFSRequestQueue:
    """Waiting requests in arrival order; preempted ones go back to the front."""

    def __init__(self) -> None:
        self._queue: collections.deque[Request] = collections.deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def remove_requests(self, requests: set[Request]) -> None:
        """Drop every queued request in ``requests``: one pass over the queue."""
        if requests:
            self._queue = collections.deque(r for r in self._queue if r not in requests)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityRequestQueue:
    """Waiting requests by (priority, arrival_time); a preempted request keeps its place."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._tiebreak = itertools.count()

    def add(self, request: Request) -> None:
        entry = (request.priority, request.arrival_time, next(self._tiebreak), request)
        heapq.heappush(self._heap, entry)

    prepend = add

    def peek(self) -> Request:
        return self._heap[0][-1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[-1]

    def remove(self, request: Request) -> None:
        self.remove_requests({request})

    def remove_requests(self, requests: set[Request]) -> None:
        """Drop every queued request in ``requests``: one pass and one heapify."""
        if requests:
            self._heap = [entry for entry in self._heap if entry[-1] not in requests]
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[-1] for entry in sorted(self._heap, key=lambda e: e[:3]))


def create_request_queue(policy: str) -> FCFSRequestQueue | PriorityRequestQueue:
    """The waiting queue for a scheduling policy ("fcfs" or "priority")."""
    if policy == "priority":
        return PriorityRequestQueue()
    if policy == "fcfs":
        return FCFSRequestQueue()
    raise ValueError(f"policy must be 'fcfs' or 'priority', got {policy!r}")


def _as_token_ids(token_ids: Iterable[int], request_id: str) -> list[int]:
    """A plain list of non-negative Python ints (numpy integers accepted)."""
    try:
        ids = [operator.index(t) for t in token_ids]
    except TypeError as e:
        raise ValueError(f"prompt_token_ids must be ints (request {request_id!r}): {e}") from None
    if not ids:
        raise ValueError(f"prompt_token_ids must not be empty (request {request_id!r})")
    if min(ids) < 0:
        raise ValueError(f"prompt_token_ids must be >= 0, got {min(ids)} (request {request_id!r})")
    return ids
