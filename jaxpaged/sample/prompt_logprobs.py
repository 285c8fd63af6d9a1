"""Prompt logprobs: which rows of a step's hidden states give them, and the program that computes
them.

The model step returns the final hidden states of all T tokens. Only when a step schedules prompt
positions of a request that asked for ``prompt_logprobs`` does the runner plan those rows
(``plan_prompt_logprobs``) and run ``prompt_logprobs_program``, which turns them into logits chunk by
chunk; it compiles on first use for each (row bucket, top-N bucket) pair, so steps without prompt
logprobs never compile it.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import numpy as np
from flax import nnx

from jaxpaged.sample.sampler import SampleLogprobs, gather_logprobs
from jaxpaged.core.scheduler_output import ScheduledRequest

# Hidden rows turned into logits at once by prompt_logprobs_program: f32[256, V] is 128 MB at
# V=128k.
PROMPT_LOGPROBS_CHUNK = 256
_POSITIONS = operator.attrgetter("prompt_logprobs_positions")


@dataclasses.dataclass(frozen=True)
class PromptLogprobsChunk:
    """Raw logprobs of consecutive prompt tokens ``first_index ..`` (host numpy, n of them).

    Prompt token i's logprob is read from the model's distribution after tokens < i (so
    ``first_index >= 1``); ranks count the tokens at least as likely (vLLM's rank)."""

    first_index: int  # prompt index of the first token
    token_ids: np.ndarray  # i32[n] the prompt tokens
    logprobs: np.ndarray  # f32[n] their logprobs
    ranks: np.ndarray  # i32[n] their ranks (1 = most likely)
    top_ids: np.ndarray  # i32[n, N] the N most likely tokens, most likely first
    top_logprobs: np.ndarray  # f32[n, N] their logprobs


@functools.partial(jax.jit, static_argnames=("graphdef", "state_treedef", "num_top", "chunk"))
def prompt_logprobs_program(graphdef, state_treedef, state_leaves: list[jax.Array],
                            hidden: jax.Array, rows: jax.Array, targets: jax.Array, *,
                            num_top: int, chunk: int) -> SampleLogprobs:
    """Raw logprobs of ``targets`` i32[R] under the distributions of ``hidden[rows]`` ([T, hidden],
    i32[R]), with their ranks and the top ``num_top`` tokens; R is a multiple of ``chunk``, and
    only ``chunk`` rows of f32[chunk, V] logits exist at a time. -> SampleLogprobs [R]."""
    model = nnx.merge(graphdef, jax.tree.unflatten(state_treedef, state_leaves))

    def one_chunk(args: tuple[jax.Array, jax.Array]) -> SampleLogprobs:
        chunk_rows, chunk_targets = args  # i32[chunk] each
        raw = jax.nn.log_softmax(model.compute_logits(hidden[chunk_rows]), axis=-1)  # [chunk, V]
        return gather_logprobs(raw, chunk_targets, num_top)

    out = jax.lax.map(one_chunk, (rows.reshape(-1, chunk), targets.reshape(-1, chunk)))
    return jax.tree.map(lambda x: x.reshape(rows.shape[0], *x.shape[2:]), out)


@dataclasses.dataclass(frozen=True)
class PromptLogprobsPlan:
    """Which hidden rows of a step give prompt logprobs, and whose they are."""

    rows: list[int]  # token index in the step of each position, requests one after another
    targets: list[int]  # the prompt token each row's distribution is asked about
    # (req_id, first prompt index, number of rows, top-N it asked for (-1 resolved to the
    # vocabulary size)), in row order
    spans: list[tuple[str, int, int, int]]

    @property
    def max_top(self) -> int:
        return max(span[3] for span in self.spans)

    def padded_inputs(self, vocab_size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(rows i32[R], targets i32[R], num_top, chunk) for ``prompt_logprobs_program``: R is
        the row count rounded up (``_round_up_rows``), padding rows read row 0."""
        num_rows = len(self.rows)
        padded = _round_up_rows(num_rows)
        chunk = min(padded, PROMPT_LOGPROBS_CHUNK)  # divides padded: both are powers of two
        rows = np.zeros(padded, np.int32)
        rows[:num_rows] = self.rows
        targets = np.zeros(padded, np.int32)
        targets[:num_rows] = self.targets
        return rows, targets, _num_top_bucket(self.max_top, vocab_size), chunk

    def split(self, out: SampleLogprobs) -> dict[str, PromptLogprobsChunk]:
        """Device results of all (padded) rows -> one host chunk per request."""
        out = jax.device_get(out)
        chunks, start = {}, 0
        for req_id, first_index, count, num_top in self.spans:
            end = start + count
            chunks[req_id] = PromptLogprobsChunk(
                first_index=first_index, token_ids=np.asarray(self.targets[start:end], np.int32),
                logprobs=np.asarray(out.sampled_logprob[start:end]),
                ranks=np.asarray(out.sampled_rank[start:end]),
                top_ids=np.asarray(out.top_ids[start:end, :num_top]),
                top_logprobs=np.asarray(out.top_logprobs[start:end, :num_top]))
            start = end
        return chunks


def plan_prompt_logprobs(scheduled: list[ScheduledRequest],
                         vocab_size: int) -> PromptLogprobsPlan | None:
    """Hidden state at position p predicts token p + 1: position p of a request whose new tokens
    start at ``num_computed_tokens`` (token index ``offset`` in the step) is row
    ``offset + p - num_computed_tokens`` and gives prompt token p + 1's logprob. A request's
    ``prompt_logprobs=-1`` asks for all ``vocab_size`` tokens (vLLM). Nearly every step has no
    such position: that is found without a Python loop over the requests."""
    if not any(map(_POSITIONS, scheduled)):
        return None
    rows: list[int] = []
    targets: list[int] = []
    spans = []
    offset = 0
    for r in scheduled:
        positions = r.prompt_logprobs_positions
        if positions:
            first_row = offset + positions.start - r.num_computed_tokens
            rows.extend(range(first_row, first_row + len(positions)))
            targets.extend(r.prompt_token_ids[positions.start + 1:positions.stop + 1])
            num_top = r.sampling_params.prompt_logprobs
            spans.append((r.req_id, positions.start + 1, len(positions),
                          vocab_size if num_top == -1 else num_top))
        offset += len(r.token_ids)
    return PromptLogprobsPlan(rows, targets, spans) if spans else None


def _round_up_rows(num_rows: int) -> int:
    """Row count padded to a power of two (at least 16; above the chunk size that is a multiple of
    it): few distinct shapes, so few compilations of prompt_logprobs_program."""
    return max(16, 1 << (num_rows - 1).bit_length())


def _num_top_bucket(num_top: int, vocab_size: int) -> int:
    """The top-N computed for a step: a power of two >= the largest asked for (>= 1, as top_k
    needs), capped at the vocabulary; each request keeps its own N of them."""
    return min(vocab_size, 1 if num_top <= 1 else 1 << (num_top - 1).bit_length())
