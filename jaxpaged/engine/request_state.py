"""What the engine keeps per request between steps to build its ``RequestOutput``s.

A request with ``n`` samples is one ``RequestState`` holding ``n`` ``SequenceState``s (created as
each child sequence first gets tokens). The output processor appends each step's tokens and
logprobs to them; ``RequestState.output`` then turns them into the step's ``RequestOutput`` per
the request's ``output_kind``.
"""

from __future__ import annotations

import dataclasses

from jaxpaged.core.request import Request
from jaxpaged.engine.detokenizer import IncrementalDetokenizer
from jaxpaged.outputs import (CompletionOutput, Logprob, PromptLogprobs, RequestMetrics,
                              RequestOutput)
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams


@dataclasses.dataclass
class SequenceState:
    """One of a request's n samples, as the engine reports it."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_reported_tokens: int = 0  # tokens already sent in DELTA outputs

    @classmethod
    def for_request(cls, request: Request, prompt_token_ids: list[int],
                    tokenizer) -> SequenceState:
        """The empty sequence of ``request`` (one child of its parent when n > 1); without a
        tokenizer there is no text, only token ids."""
        detokenizer = (IncrementalDetokenizer(tokenizer, prompt_token_ids, request.sampling_params)
                       if tokenizer is not None else None)
        wants_logprobs = request.sampling_params.logprobs is not None
        return cls(index=request.sample_index, detokenizer=detokenizer,
                   logprobs=[] if wants_logprobs else None,
                   cumulative_logprob=0.0 if wants_logprobs else None)

    def completion(self, delta: bool) -> CompletionOutput:
        finished = self.finish_reason is not None
        text = (self.detokenizer.get_next_output_text(finished, delta)
                if self.detokenizer else "")
        start = self.num_reported_tokens if delta else 0
        self.num_reported_tokens = len(self.token_ids)
        logprobs = self.logprobs[start:] if self.logprobs is not None else None
        return CompletionOutput(index=self.index, text=text, token_ids=self.token_ids[start:],
                                cumulative_logprob=self.cumulative_logprob,
                                logprobs=logprobs, finish_reason=self.finish_reason,
                                stop_reason=self.stop_reason)


@dataclasses.dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    sequences: dict[int, SequenceState] = dataclasses.field(default_factory=dict)
    # [None] + one dict per prompt token as the steps compute them; None: not asked for
    prompt_logprobs: PromptLogprobs | None = None
    prompt_logprobs_sent: bool = False  # DELTA outputs send them once
    num_finished: int = 0  # sequences with a finish_reason (kept by OutputProcessor)
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache served (sample 0's)

    def add_prompt_logprobs(self, first_index: int, entries: list[dict[int, Logprob]]) -> None:
        """Entries for prompt tokens ``first_index ..``; the scheduler hands out each position
        once and in order, so they always continue the list."""
        if self.prompt_logprobs is None or first_index != len(self.prompt_logprobs):
            have = None if self.prompt_logprobs is None else len(self.prompt_logprobs)
            raise RuntimeError(f"request {self.request_id!r}: prompt logprobs from index "
                               f"{first_index} do not continue the {have} collected")
        self.prompt_logprobs.extend(entries)

    def _prompt_logprobs_to_send(self, delta: bool) -> PromptLogprobs | None:
        """The whole list once complete (every output; DELTA: only the first), else None."""
        logprobs = self.prompt_logprobs
        if logprobs is None or len(logprobs) < len(self.prompt_token_ids):
            return None
        if delta:
            if self.prompt_logprobs_sent:
                return None
            self.prompt_logprobs_sent = True
        return logprobs

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n

    def output(self, changed: set[int] | None) -> RequestOutput | None:
        """This step's output for the request per its ``output_kind`` (None: nothing to send).
        ``changed``: indices of the sequences that progressed (None: only sequence 0, n == 1).

        CUMULATIVE: every sequence so far; DELTA: the sequences that changed, with only their new
        tokens and text; FINAL_ONLY: everything, once, when the last sequence finishes."""
        kind = self.params.output_kind
        finished = self.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        if changed is None:
            indices = [0]
        else:
            indices = sorted(changed) if delta else sorted(self.sequences)
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids,
                             prompt_logprobs=self._prompt_logprobs_to_send(delta),
                             outputs=[self.sequences[i].completion(delta) for i in indices],
                             finished=finished, metrics=self.metrics,
                             num_cached_tokens=self.num_cached_tokens)

