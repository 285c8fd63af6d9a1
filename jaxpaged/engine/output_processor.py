"""Outputs out: each step's updates (new tokens, finishes) and logprobs are appended to the
requests' states, detokenized with stop-string checks, and turned into ``RequestOutput``s.

A request with ``n > 1`` runs as ``n`` child sequences in the scheduler; their updates are
gathered back under the parent's id here. A stop string found while detokenizing finishes the
sequence in the scheduler too (the one edge back from output processing to the core).

Logprob entries carry each token's own text (``Logprob.decoded_token``, vLLM's
``tokenizer.decode([id])``), decoded once per token id (``TokenTexts``) and only for requests that
asked for logprobs and detokenize."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping

from jaxpaged.core.request import Request, RequestStatus
from jaxpaged.core.scheduler import Scheduler
from jaxpaged.core.scheduler_output import RequestUpdate, SchedulerOutput
from jaxpaged.engine.request_state import RequestState, SequenceState
from jaxpaged.engine.tokenizer import TokenTexts
from jaxpaged.outputs import Logprob, RequestOutput
from jaxpaged.runner.step_logprobs import TokenLogprobs
from jaxpaged.sample.prompt_logprobs import PromptLogprobsChunk


class OutputProcessor:
    def __init__(self, tokenizer, scheduler: Scheduler):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.requests: dict[str, RequestState] = {}  # parent request id -> its state
        self.token_texts = TokenTexts(tokenizer)

    def add(self, state: RequestState) -> None:
        self.requests[state.request_id] = state

    def mark_scheduled(self, scheduler_output: SchedulerOutput) -> None:
        """Queue time of the requests the step schedules for the first time."""
        now = time.time()
        for s in scheduler_output.scheduled:
            if s.num_computed_tokens:  # scheduled before (its first step starts at token 0)
                continue
            state = self.requests.get(self._parent_id(s.req_id))
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = now
                state.metrics.time_in_queue = now - state.metrics.arrival_time

    def collect_prompt_logprobs(self, chunks: dict[str, PromptLogprobsChunk]) -> None:
        """Before the step's updates are applied: a request finishing in this step still gets
        its last prompt logprobs."""
        for req_id, chunk in chunks.items():
            state = self.requests.get(self._parent_id(req_id))
            if state is not None:
                entries = prompt_logprob_entries(chunk, self.token_texts, state.params.detokenize)
                state.add_prompt_logprobs(chunk.first_index, entries)

    def process(self, updates: list[RequestUpdate],
                logprobs: Mapping[str, TokenLogprobs]) -> list[RequestOutput]:
        """Runs once per step for every request that got tokens: keep it lean (at batch 256 it
        is a large part of a step's host time)."""
        now = time.time()
        # request id -> (state, indices of its sequences that changed; None: n == 1)
        touched: dict[str, tuple[RequestState, set[int] | None]] = {}
        requests = self.requests
        for update in updates:
            request = update.request
            parent_id = request.parent_id
            state = requests.get(parent_id or request.request_id)
            if state is None:
                continue
            index = request.sample_index
            seq = state.sequences.get(index)
            if seq is None:  # its first tokens: admitted, so its prefix-cache hit is known
                seq = state.sequences[index] = SequenceState.for_request(
                    request, state.prompt_token_ids, self.tokenizer)
                if index == 0:
                    state.num_cached_tokens = request.num_cached_tokens
            self._append(state, seq, request, update,
                         logprobs.get(request.request_id) if logprobs else None)
            metrics = state.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            if parent_id is None:
                touched[state.request_id] = (state, None)
            else:
                touched.setdefault(state.request_id, (state, set()))[1].add(index)
        outputs = []
        for state, changed in touched.values():
            if state.finished:
                state.metrics.finished_time = now
                del requests[state.request_id]
            output = state.output(changed)
            if output is not None:
                outputs.append(output)
        return outputs

    def _append(self, state: RequestState, seq: SequenceState, request: Request,
                update: RequestUpdate, token_logprobs: TokenLogprobs | None) -> None:
        seq.token_ids.extend(update.new_token_ids)
        if seq.logprobs is not None and token_logprobs is not None and update.new_token_ids:
            token = update.new_token_ids[-1]
            texts = self.token_texts.texts([token, *token_logprobs.top],
                                           request.sampling_params.detokenize)
            entry = {t: Logprob(v, rank=i + 1, decoded_token=texts[t])
                     for i, (t, v) in enumerate(token_logprobs.top.items())}
            entry[token] = Logprob(token_logprobs.sampled_logprob, rank=token_logprobs.sampled_rank,
                                   decoded_token=texts[token])
            seq.logprobs.append(entry)
            seq.cumulative_logprob += token_logprobs.sampled_logprob
        stop_string = seq.detokenizer.update(update.new_token_ids) if seq.detokenizer else None
        if stop_string is not None and not request.is_finished():
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED,
                                          stop_string)
        was_finished = seq.finish_reason is not None
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
        elif request.is_finished():
            seq.finish_reason = request.get_finished_reason()
            seq.stop_reason = request.stop_reason
        if not was_finished and seq.finish_reason is not None:
            state.num_finished += 1

    def _parent_id(self, req_id: str) -> str:
        request = self.scheduler.requests.get(req_id)
        return request.parent_id or req_id if request is not None else req_id


def prompt_logprob_entries(chunk: PromptLogprobsChunk, token_texts: TokenTexts,
                           detokenize: bool = True) -> list[dict[int, Logprob]]:
    """One dict per prompt token: the token itself first (its own rank), then the top-N by rank
    (vLLM's layout); ``decoded_token`` is each id's text when there is a tokenizer."""
    top_ids, top_logprobs = chunk.top_ids.tolist(), chunk.top_logprobs.tolist()
    token_ids = chunk.token_ids.tolist()
    texts = token_texts.texts(itertools.chain(token_ids, *top_ids), detokenize)
    entries = []
    for token, logprob, rank, tops, top_values in zip(token_ids, chunk.logprobs.tolist(),
                                                      chunk.ranks.tolist(), top_ids, top_logprobs):
        entry = {token: Logprob(logprob, rank=rank, decoded_token=texts[token])}
        for top_rank, (top_id, value) in enumerate(zip(tops, top_values), start=1):
            if top_id not in entry:
                entry[top_id] = Logprob(value, rank=top_rank, decoded_token=texts[top_id])
        entries.append(entry)
    return entries
