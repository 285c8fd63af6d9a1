"""Continuous batching without phases (vLLM v1's scheduler, nano-vllm sized).

Each request has ``num_computed_tokens`` and ``num_tokens``; one step has one token budget
(``max_num_batched_tokens``). ``schedule()`` first gives every running request its next tokens (one
decode token, or its next prefill chunk), then admits waiting requests while tokens, sequence slots
(``max_num_seqs``) and KV blocks last. So prefill chunks and decodes share a batch, and chunked
prefill is just "fewer tokens than the request has left".

When a running request cannot get a block, the scheduler preempts by recompute: the latest (or
lowest-priority) running request loses its blocks, resets ``num_computed_tokens`` to 0 and goes to
the front of the waiting queue; its output tokens stay and are recomputed as part of its prompt.

Beam search groups (``jaxpaged.core.beam_group``): their beams are running requests with a
``beam_group_id``; preempting one preempts the whole group (it is recomputed as a whole), and a
waiting group's first beam holds the seats of all its beams (``Request.num_seats``).

Parallel sampling (``n > 1``) shares the prompt's KV blocks between the ``n`` samples without any
device-side copy. The parent computes its prompt only up to the last block boundary that leaves at
least one prompt token uncomputed, ``B = (num_prompt_tokens - 1) // block_size * block_size``; then
it is forked into ``n`` children (``f"{request_id}-{i}"``, ``parent_id`` set) that share those
``B / block_size`` full blocks (ref_cnt = n) and each compute the remaining prompt tokens into their
own blocks, sample and decode independently::

    parent prompt (block_size 4, 10 tokens):  [p0 p1 p2 p3][p4 p5 p6 p7][p8 p9]
    parent computes B = 8 tokens:              [ shared #3 ][ shared #5 ]
    child i then computes p8 p9 + its samples:                           [p8 p9 a b][c ...]

Because ``B`` is a block boundary no child ever writes into a shared block. A prompt of at most one
block (``B == 0``) is forked at once; a parent whose first ``B`` tokens are all prefix-cache hits is
forked on admission and its children find the same blocks in the cache. A waiting parent reserves
``n`` of the ``max_num_seqs`` slots so that the fork never overfills the batch. A preempted child
recomputes like any request (with prefix caching it finds the shared blocks again).

Async scheduling: ``schedule()`` runs while the previous step is still on the device. A request whose
step samples gets an output placeholder at once (``Request.num_output_placeholders``), so the next
``schedule()`` already gives it its decode token, with id -1 (the runner fills it on the device
from the previous step's samples). ``update_from_output`` of the previous step then replaces the
placeholder by the real id and checks stops as usual; a request that finished meanwhile has its
in-flight token dropped. Length caps known in advance (max_tokens, max_model_len, placeholders
counted) keep a request from being scheduled past them.

Prompt logprobs: each step tells the runner which computed positions still owe a prompt logprob
(``Request.take_prompt_logprob_positions``), so chunks, the parent/child split of ``n > 1`` (only
sample 0 asks) and recomputation after preemption each report every prompt token exactly once. Such
a request reads the prefix cache only up to the positions it has reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from jaxpaged.core.block_manager import BlockManager
from jaxpaged.core.request import Request, RequestStatus, create_request_queue
from jaxpaged.core.scheduler_config import QueueFullError, SchedulerConfig
from jaxpaged.core.scheduler_output import (RequestUpdate, ScheduledRequest, SchedulerOutput,
                                           SchedulerStats)
from jaxpaged.core.step_plan import StepPlan
from jaxpaged.core.step_update import (SampledTokenIds, as_ids, check_stop,
                                      sampled_by_request_id)

_new_tuple = tuple.__new__  # builds a NamedTuple from all its fields (see scheduler_output)


class Scheduler:
    """Decides which tokens of which requests each step computes, and owns their KV blocks."""

    def __init__(self, config: SchedulerConfig, num_blocks: int) -> None:
        self.config = config
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        # NOTE: progress needs one max_model_len sequence to fit alone (as vLLM checks at start-up).
        if self.block_manager.num_blocks_for(config.max_model_len) > num_blocks - 1:
            raise ValueError(
                f"num_blocks={num_blocks} cannot hold one sequence of max_model_len="
                f"{config.max_model_len} tokens ({config.block_size}-token blocks, block 0 "
                "reserved)."
            )
        self.requests: dict[str, Request] = {}  # live (waiting or running) requests by id
        self.waiting = create_request_queue(config.policy)
        self.running: list[Request] = []  # admission order; the tail is preempted first (fcfs)
        self._children: dict[str, list[str]] = {}  # forked parent id -> ids of its live children
        self._finished_req_ids: set[str] = set()  # since the last schedule()
        self.num_preemptions = 0
        self._prefix_cache_queries = 0
        self._prefix_cache_hits = 0

    # ----- requests in and out -----

    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ValueError for bad requests, QueueFullError when full."""
        rid, n = request.request_id, request.sampling_params.n
        self._check_request_id_free(request)
        if request.num_prompt_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt of request {rid!r} has {request.num_prompt_tokens} tokens, more than "
                f"max_model_len={self.config.max_model_len}."
            )
        if n > self.config.max_num_seqs:
            raise ValueError(f"n={n} is larger than max_num_seqs={self.config.max_num_seqs}")
        if self.config.max_waiting is not None and len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
        request.status = RequestStatus.WAITING
        if n > 1 and request.shared_prefix_len(self.config.block_size) == 0:
            for child in self._fork(request):
                self.waiting.add(child)
            return
        self.requests[rid] = request
        self.waiting.add(request)

    def _check_request_id_free(self, request: Request) -> None:
        """Neither the id nor (for n > 1) its children's ids may clash with live requests."""
        rid, n = request.request_id, request.sampling_params.n
        ids = [rid] + [f"{rid}-{i}" for i in range(n if n > 1 else 0)]
        for request_id in ids:
            if request_id in self.requests or request_id in self._children:
                raise ValueError(f"request_id {request_id!r} is already in use")
        parent_id, _, index = rid.rpartition("-")
        parent = self.requests.get(parent_id)
        if parent is not None and index.isdigit() and int(index) < parent.sampling_params.n:
            raise ValueError(f"request_id {rid!r} is reserved for a sample of {parent_id!r}")

    def abort_request(self, request_id: str) -> list[Request]:
        """Abort a request (waiting or running; a parent id aborts all its children)."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Abort many requests at once (vLLM's ``finish_requests`` of a list): the waiting queue
        and the running list are each filtered once, so aborting k of w waiting requests costs
        O(w + k), not O(w * k). Unknown or finished ids are ignored; parent ids abort children."""
        finished: list[Request] = []
        for request_id in request_ids:
            for rid in self._children.get(request_id, [request_id]):
                request = self.requests.get(rid)
                if request is not None and not request.is_finished():
                    request.status = RequestStatus.FINISHED_ABORTED  # marked: dequeued below
                    finished.append(request)
        if not finished:
            return finished
        gone = set(finished)
        self.waiting.remove_requests(gone)
        if any(r in gone for r in self.running):
            self.running = [r for r in self.running if r not in gone]
        for request in finished:
            self._finish(request, RequestStatus.FINISHED_ABORTED, None, dequeued=True)
        return finished

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> list[Request]:
        """Finish a request from outside (abort, or a stop string seen by the detokenizer).

        Frees its blocks; unknown or already finished ids are ignored. Returns the requests that
        this call finished (the children, for the id of a forked parent).
        """
        if not RequestStatus.is_finished(status):
            raise ValueError(f"status must be a finished status, got {status!r}")
        ids = list(self._children.get(request_id, [request_id]))
        finished = [self.requests[rid] for rid in ids if rid in self.requests]
        for request in finished:
            self._finish(request, status, stop_reason)
        return finished

    def preempt_all_running(self) -> None:
        """Preempt every running request (recompute from its tokens; order kept at the front of
        the waiting queue): after a failed step, whose K/V writes may be missing."""
        for request in reversed(self.running):
            self.block_manager.free(request)
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
            request.num_output_placeholders = 0
            request.num_preemptions += 1
            self.num_preemptions += 1
            self.waiting.prepend(request)
        self.running = []

    # ----- one step -----

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and tokens; allocates blocks, may preempt and fork."""
        budget = self.config.max_num_batched_tokens
        plan = StepPlan(token_budget=budget)
        self._schedule_running(plan)
        # NOTE: after a preemption the pool is tight; admitting new work would thrash.
        if not plan.preempted_req_ids and len(self.waiting):
            self._schedule_waiting(plan)
        finished_req_ids, self._finished_req_ids = self._finished_req_ids, set()
        scheduled, parents = plan.commit(self.block_manager.tables,
                                         block_size=self.config.block_size,
                                         async_scheduling=self.config.async_scheduling)
        for parent in parents:  # their shared prefix is computed now
            self._fork_running(parent)
        return SchedulerOutput(
            scheduled=scheduled,
            total_num_scheduled_tokens=budget - plan.token_budget,
            finished_req_ids=finished_req_ids,
            preempted_req_ids=plan.preempted_req_ids,
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: SampledTokenIds
    ) -> list[RequestUpdate]:
        """Apply the step's sampled tokens: append, check stops, free finished requests.

        ``sampled_token_ids`` maps req_id -> the ids sampled for it (or is a list of rows aligned
        with ``scheduler_output.scheduled``); entries of requests with ``do_sample == False`` are
        ignored. Requests finished, aborted or preempted since ``schedule()`` are skipped, except
        that (async scheduling) a request preempted after this step was dispatched still gets its
        sampled token, which resolves its placeholder.
        """
        sampled = sampled_by_request_id(scheduler_output, sampled_token_ids)
        updates: list[RequestUpdate] = []
        requests, running = self.requests, RequestStatus.RUNNING
        tables = self.block_manager.tables
        cache_full_blocks = self.block_manager.cache_full_blocks
        apply_sample, max_model_len = self._apply_sample, self.config.max_model_len
        # NOTE: runs for every request every step; cache_full_blocks is only called when a block
        # may have filled up (BlockTable.cache_from), which is what it would check first.
        for scheduled in scheduler_output.scheduled:
            request = requests.get(scheduled.req_id)
            if request is None:
                continue
            if request.status != running:
                # async: a request preempted since this step was scheduled still owes its token
                if (scheduled.do_sample and request.num_output_placeholders
                        and request.status == RequestStatus.PREEMPTED):
                    updates.append(apply_sample(request, scheduled, sampled))
                continue
            # async: the next step's tokens may already count as computed; their blocks can be
            # hashed only once the placeholder is resolved (below)
            num_computed_tokens = request.num_computed_tokens
            hashed = num_computed_tokens <= len(request.all_token_ids)
            if hashed:
                table = tables.get(scheduled.req_id)
                if table is not None and num_computed_tokens >= table.cache_from:
                    cache_full_blocks(request)
            if not scheduled.do_sample:
                continue
            token_id = sampled.get(scheduled.req_id)
            if type(token_id) is int:  # _apply_sample of one sampled id, inline
                if request.num_output_placeholders:
                    request.num_output_placeholders -= 1
                request.append_output_token_id(token_id)
                stop = check_stop(request, max_model_len)
                if stop is not None:
                    self._finish(request, *stop)
                updates.append(_new_tuple(RequestUpdate, (request, [token_id], stop is not None)))
            else:
                updates.append(apply_sample(request, scheduled, sampled))
            if not hashed and request.status == running:
                table = tables.get(scheduled.req_id)
                if table is not None and num_computed_tokens >= table.cache_from:
                    cache_full_blocks(request)
        return updates

    def _apply_sample(self, request: Request, scheduled: ScheduledRequest,
                      sampled: Mapping[str, object]) -> RequestUpdate:
        """Append a sampled request's token(s) (resolving its placeholder) and check stops."""
        token_ids = sampled.get(scheduled.req_id)
        if token_ids is None:
            raise ValueError(f"no sampled token ids for request {scheduled.req_id!r}")
        if request.num_output_placeholders:
            request.num_output_placeholders -= 1
        new_token_ids = self._append_until_stop(request, as_ids(token_ids))
        return RequestUpdate(request, new_token_ids, request.is_finished())

    # ----- queries -----

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def make_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.block_manager.usage,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self._prefix_cache_queries,
            prefix_cache_hits=self._prefix_cache_hits,
        )

    # ----- scheduling internals -----

    def _schedule_running(self, plan: StepPlan) -> None:
        running, tables = RequestStatus.RUNNING, self.block_manager.tables
        planned = plan.scheduled
        for request in list(self.running):
            budget = plan.token_budget
            if budget == 0:
                break
            if request.status != running:
                continue  # preempted by an earlier request of this loop
            # NOTE: _num_tokens_to_compute of an n == 1 request, inline (every request, every
            # step); async: the length-cap check is only needed while a placeholder is pending.
            if request.sampling_params.n > 1:
                num_new_tokens = self._num_tokens_to_compute(request)
            else:
                placeholders = request.num_output_placeholders
                if placeholders and self._capped_by_placeholders(request):
                    continue
                num_new_tokens = (len(request.all_token_ids) + placeholders
                                  - request.num_computed_tokens)
            if num_new_tokens > budget:
                if self._must_not_split(request):
                    continue  # the rest of its prompt waits for a step with room for all of it
                num_new_tokens = budget
            if num_new_tokens <= 0:
                continue
            # Nearly every step the request's last block still has room (allocate_slots would
            # return []); only then is the call skipped.
            table = tables.get(request.request_id)
            if (table is None or request.num_computed_tokens + num_new_tokens > table.num_slots
                    ) and not self._allocate_or_preempt(request, num_new_tokens, plan):
                break
            planned.append((request, num_new_tokens))  # plan.add, inline
            plan.token_budget -= num_new_tokens

    def _must_not_split(self, request: Request) -> bool:
        """Without chunked prefill a prompt is computed in one step; the children of an n > 1
        request enter the running list with only their shared prefix computed, so the rest of
        their prompt must not be cut to the step's remaining budget either."""
        return (not self.config.enable_chunked_prefill
                and request.num_computed_tokens < request.num_prompt_tokens)

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int, plan: StepPlan) -> bool:
        """Allocate, preempting victims until it fits; False if the request itself was preempted."""
        while self.block_manager.allocate_slots(request, num_new_tokens) is None:
            victim = self._pick_victim()
            self._preempt(victim, plan)
            if victim is request or request.status != RequestStatus.RUNNING:
                return False  # (a beam goes with its group)
        return True

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            ranked = ((r.priority, r.arrival_time, i) for i, r in enumerate(self.running))
            return self.running[max(ranked)[2]]
        return self.running[-1]

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        self._preempt_one(request, plan)
        if request.beam_group_id is not None:  # a beam group is recomputed as a whole
            for sibling in [r for r in self.running if r.beam_group_id == request.beam_group_id]:
                self._preempt_one(sibling, plan)

    def _preempt_one(self, request: Request, plan: StepPlan) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        plan.drop(request)
        plan.preempted_req_ids.add(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)

    def _schedule_waiting(self, plan: StepPlan) -> None:
        if len(self.running) >= self.config.max_num_seqs:
            return  # every running request holds at least one seat: the batch is full
        seats_used = sum(r.num_seats for r in self.running)
        while len(self.waiting) and plan.token_budget > 0:
            request = self.waiting.peek()
            if seats_used + request.num_seats > self.config.max_num_seqs:
                break
            hit = self.block_manager.get_computed_blocks(request)
            num_new_tokens = self._num_tokens_to_compute(request) - hit.num_computed_tokens
            if request.sampling_params.n > 1 and num_new_tokens == 0:  # shared prefix all cached
                self.waiting.pop()
                for child in reversed(self._fork(request)):
                    self.waiting.prepend(child)
                continue
            if not self.config.enable_chunked_prefill and num_new_tokens > plan.token_budget:
                break
            num_new_tokens = min(num_new_tokens, plan.token_budget)
            if self.block_manager.allocate_slots(request, num_new_tokens, hit.block_ids) is None:
                break
            self.waiting.pop()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = hit.num_computed_tokens
            if not request.num_preemptions:  # as vLLM: the hit of its first admission only
                request.num_cached_tokens = hit.num_computed_tokens
            self._prefix_cache_queries += request.num_tokens
            self._prefix_cache_hits += hit.num_computed_tokens
            self.running.append(request)
            seats_used += request.num_seats
            plan.add(request, num_new_tokens)

    def _num_tokens_to_compute(self, request: Request) -> int:
        """Tokens left to compute; an n > 1 parent stops at its shared prefix."""
        if request.sampling_params.n > 1:
            return max(0, request.shared_prefix_len(self.config.block_size)
                       - request.num_computed_tokens)
        placeholders = request.num_output_placeholders
        if placeholders and self._capped_by_placeholders(request):
            return 0  # its in-flight token is its last one: nothing more to compute
        return max(0, len(request.all_token_ids) + placeholders - request.num_computed_tokens)

    def _capped_by_placeholders(self, request: Request) -> bool:
        """True when the request reaches a length cap once its placeholders are resolved."""
        placeholders = request.num_output_placeholders
        max_tokens = request.sampling_params.max_tokens
        return (len(request.all_token_ids) + placeholders >= self.config.max_model_len
                or (max_tokens is not None
                    and len(request.output_token_ids) + placeholders >= max_tokens))

    # ----- parallel sampling -----

    def _fork(self, parent: Request) -> list[Request]:
        """Replace an n > 1 parent by its n children; they share any blocks the parent holds."""
        children = [parent.make_child(i) for i in range(parent.sampling_params.n)]
        for child in children:
            if child.request_id in self.requests or child.request_id in self._children:
                raise ValueError(f"request_id {child.request_id!r} (a child) is already in use")
        if self.block_manager.get_block_ids(parent.request_id):
            self.block_manager.fork(parent.request_id, [c.request_id for c in children])
        else:
            self.block_manager.free(parent)  # holds no blocks: only drops its memoised hashes
        for child in children:
            child.status = parent.status
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            self.requests[child.request_id] = child
        if self.requests.pop(parent.request_id, None) is not None:
            self._finished_req_ids.add(parent.request_id)  # the runner may drop the parent's state
        self._children[parent.request_id] = [c.request_id for c in children]
        return children

    def _fork_running(self, parent: Request) -> None:
        index = self.running.index(parent)
        self.running[index : index + 1] = self._fork(parent)

    # ----- finishing -----

    def _append_until_stop(self, request: Request, token_ids: list[int]) -> list[int]:
        for i, token_id in enumerate(token_ids):
            request.append_output_token_id(token_id)
            stop = check_stop(request, self.config.max_model_len)
            if stop is not None:
                self._finish(request, *stop)
                return token_ids[: i + 1]
        return token_ids

    def _finish(
        self, request: Request, status: RequestStatus, stop_reason: int | str | None,
        dequeued: bool = False,
    ) -> None:
        """``dequeued``: the caller already took the request out of the running list / queue."""
        if dequeued:
            pass
        elif request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = status
        request.stop_reason = stop_reason
        del self.requests[request.request_id]
        self._finished_req_ids.add(request.request_id)
        siblings = self._children.get(request.parent_id) if request.parent_id else None
        if siblings is not None:
            siblings.remove(request.request_id)
            if not siblings:
                del self._children[request.parent_id]
