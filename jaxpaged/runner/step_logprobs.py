"""One step's sampled-token logprobs on the host, per request on demand.

The sampler returns the logprobs of every sampled row as four device arrays. Turning each row into
a ``TokenLogprobs`` (a dict of its top ids) costs Python work per row and step; a beam search step
(``jaxpaged.engine.beam_search``) reads its rows as arrays instead and never needs the dicts. So
``StepLogprobs`` keeps the host arrays and builds a row's ``TokenLogprobs`` only when a caller
looks it up (the output processor does, for requests that asked for logprobs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one sampled token (raw model distribution, vLLM's default)."""

    sampled_logprob: float
    sampled_rank: int
    top: dict[int, float]  # top-N token id -> logprob, most likely first


@dataclasses.dataclass(frozen=True)
class LogprobArrays:
    """The sampler's logprobs of one step on the host, rows in sampler order."""

    top_ids: np.ndarray  # i32[B, N]: the N most likely token ids, most likely first
    top_logprobs: np.ndarray  # f32[B, N]: their raw logprobs
    sampled_logprob: np.ndarray  # f32[B]: raw logprob of the sampled token
    sampled_rank: np.ndarray  # i32[B]: 1 + number of tokens more likely than it


class StepLogprobs(Mapping[str, TokenLogprobs]):
    """req_id -> ``TokenLogprobs`` for the rows that asked for logprobs, built on lookup.

    ``rows``: req_id -> (row in ``arrays``, how many top entries it asked for; -1: all N)."""

    def __init__(self, arrays: LogprobArrays, rows: dict[str, tuple[int, int]]) -> None:
        self.arrays = arrays
        self.rows = rows

    def __getitem__(self, req_id: str) -> TokenLogprobs:
        row, n = self.rows[req_id]
        arrays = self.arrays
        n = arrays.top_ids.shape[1] if n < 0 else n
        top = dict(zip(arrays.top_ids[row, :n].tolist(), arrays.top_logprobs[row, :n].tolist()))
        return TokenLogprobs(float(arrays.sampled_logprob[row]), int(arrays.sampled_rank[row]),
                             top)

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, req_id: object) -> bool:
        return req_id in self.rows
