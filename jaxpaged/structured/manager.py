"""The engine's structured outputs: each constrained request's matcher, advanced by its sampled
tokens, and each step's token bitmask (``bitmask``) for the jitted sampler.

A request's constraint is compiled in the ``GrammarCache``'s threads while the request waits
outside the scheduler (``LLMEngine`` admits it once its future is done). Each sampled row then
gets one int32 bitmask row, ``ceil(vocab_size / 32)`` words, bit ``t % 32`` of word ``t // 32``
set when token ``t`` may come next (llguidance fills the rows of a step in parallel); rows without
a constraint carry all ones. The mask of a step needs every token the request sampled before, so
a constrained row never has a token in flight when its mask is filled (the engine applies the
previous step first, while the model step runs on the device).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import logging
from collections.abc import Sequence

import llguidance
import llguidance.numpy
import numpy as np

from jaxpaged.core.scheduler_output import ScheduledRequest
from jaxpaged.structured.backend import GuidanceBackend
from jaxpaged.structured.bitmask import bitmask_width
from jaxpaged.structured.grammar_cache import GrammarCache
from jaxpaged.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


class GrammarState(enum.Enum):
    RUNNING = "running"  # more tokens may follow
    STOPPED = "stopped"  # the grammar accepts and nothing may follow: the request ends ("stop")
    FAILED = "failed"  # a token the grammar rejects (cannot happen under the mask)


@dataclasses.dataclass(eq=False)
class _Row:
    matcher: llguidance.LLMatcher
    num_consumed: int = 0  # output tokens the matcher has seen


class StructuredOutputManager:
    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 compile_threads: int = 2):
        self.vocab_size = vocab_size
        self.width = bitmask_width(vocab_size)
        self.cache = GrammarCache(GuidanceBackend(hf_tokenizer, vocab_size, eos_token_ids),
                                  compile_threads)
        self._executor = llguidance.LLExecutor()
        self._rows: dict[str, _Row] = {}  # request id -> its matcher

    def submit(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        """Starts compiling (or finds) the constraint; ValueError for an invalid one."""
        return self.cache.submit(params)

    def _row(self, request_id: str, params: StructuredOutputsParams) -> _Row:
        row = self._rows.get(request_id)
        if row is None:
            template = self.cache.submit(params).result()  # compiled before admission
            row = self._rows[request_id] = _Row(template.deep_copy())
        return row

    def bitmask(self, requests: Sequence[ScheduledRequest], pad_to: int) -> np.ndarray | None:
        """i32[pad_to, width] for the step's sampled rows (row i: ``requests[i]``); None when no
        row has a constraint (the sampler then has no mask stage)."""
        indexed = [(i, r) for i, r in enumerate(requests)
                   if r.sampling_params.structured_outputs is not None]
        if not indexed:
            return None
        mask = llguidance.numpy.allocate_token_bitmask(pad_to, self.vocab_size)  # all ones
        matchers = []
        for i, r in indexed:
            if r.req_id not in self._rows and r.num_output_tokens:
                continue  # finished (its grammar freed) while this step was scheduled: all ones
            row = self._row(r.req_id, r.sampling_params.structured_outputs)
            if row.num_consumed != r.num_output_tokens:
                raise RuntimeError(f"request {r.req_id!r} has {r.num_output_tokens} output "
                                   f"tokens but its grammar saw {row.num_consumed}")
            if not row.matcher.is_error():
                matchers.append((row.matcher, i))
        if matchers:
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, matchers, mask)
        return mask

    def accept(self, request_id: str, params: StructuredOutputsParams,
               token_ids: Sequence[int]) -> GrammarState:
        """Advance the request's matcher by its newly sampled tokens."""
        row = self._row(request_id, params)
        row.num_consumed += len(token_ids)
        if not row.matcher.consume_tokens(list(token_ids)):
            logger.warning("request %r: its grammar rejected a sampled token (%s)", request_id,
                           row.matcher.get_error())
            return GrammarState.FAILED
        return GrammarState.STOPPED if row.matcher.is_stopped() else GrammarState.RUNNING

    def free(self, request_id: str) -> None:
        self._rows.pop(request_id, None)

    def close(self) -> None:
        self.cache.close()
