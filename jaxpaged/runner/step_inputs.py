"""Host-side packing of one scheduled step into padded device inputs.

Padding rules (they let every step of a bucket share one compiled program):
  - token axis T: padding tokens have id 0, position 0 and slot -1 (never written);
  - sequence axis S: padding rows have seq_len 0, an empty query range, block table of null
    block 0, and logits index 0 (their logits are computed and ignored).

Async scheduling: a token the previous step is still sampling has id -1; ``prev_source_rows``
names, per token, the row of the previous step's sampled ids (a device array the runner hands the
model step beside these inputs) that holds it, and the model step fills it in on the device. Every
step carries ``prev_source_rows`` (all -1 when nothing is pending), so it adds no step shapes.

Packing is vectorised: a few list comprehensions over the requests, then numpy over the tokens.
The block tables (S x W ids) are the bulk of it; ``StepPacker`` keeps each request's table row
between steps and rewrites it only when the request's blocks change (in decode, once every
``block_size`` steps), so a step costs O(requests), not O(requests x blocks).
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jaxpaged.core.scheduler_output import ScheduledRequest
from jaxpaged.models.attention_metadata import AttentionMetadata
from jaxpaged.runner.buckets import StepShape
from jaxpaged.utils.row_store import RowStore


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    token_ids: jax.Array  # i32[T]
    positions: jax.Array  # i32[T]
    logits_indices: jax.Array  # i32[S]: token index of each sequence's last new token
    md: AttentionMetadata
    # i32[T]: row of the previous step's sampled ids holding the token (its token_ids entry is
    # -1), else -1
    prev_source_rows: jax.Array


@dataclasses.dataclass
class _TableRow:
    """Where one request's block table lives in ``StepPacker``'s store, and what it holds."""

    slot: int  # row of the store
    block_ids: Sequence[int] | None = None  # the list last written (compared by identity)
    num_blocks: int = 0  # its length when written


class StepPacker:
    """Packs steps into ``StepInputs``, keeping every request's block table between steps.

    Each scheduled request owns a row of a host-side store (released the first step it is not
    scheduled). A row is rewritten only when the request's ``block_ids`` is a different list
    object or has a different length than when it was written: ``BlockManager`` hands out a new
    list whenever a request's blocks change and never mutates one it handed out. A step's tables
    are then one gather of the store rows in batch order, so a request finishing or joining does
    not make the others' rows be rewritten. Arrays handed out are fresh each step.
    """

    def __init__(self, *, block_size: int, table_width: int):
        self.block_size = block_size
        self.table_width = table_width
        self._store = RowStore({"tables": (table_width, np.int32)})  # [slots, W] by slot
        self._slot_lens: list[int] = []  # blocks written in each store row (the rest is 0)
        self._rows: dict[str, _TableRow] = {}  # req_id -> its row, for last step's requests
        # Last step's batch: a batch of the same requests in the same order reuses its rows and
        # rewrites only those whose block_ids changed (found by comparing list identities).
        self._last_req_ids: list[str] = []
        self._last_block_ids: list[Sequence[int]] = []
        self._last_num_blocks = np.zeros(0, np.int64)  # [n] their lengths
        self._last_slots = np.zeros(0, np.intp)  # [n] store row of each request

    def pack(self, scheduled: Sequence[ScheduledRequest], shape: StepShape,
             prev_rows: Mapping[str, int] | None = None) -> StepInputs:
        """Numpy StepInputs for ``scheduled`` padded to ``shape`` (the jitted step moves them).
        ``prev_rows``: req_id -> its row in the previous step's sampled ids (for -1 tokens)."""
        t, s, n = shape.num_tokens, shape.num_seqs, len(scheduled)
        counts = np.fromiter([len(r.token_ids) for r in scheduled], np.int64, n)  # [n] new tokens
        starts = np.fromiter([r.num_computed_tokens for r in scheduled], np.int64, n)  # [n]
        total = int(counts.sum())
        if n > s or total > t:
            raise ValueError(f"{n} requests with {total} tokens do not fit the step shape {shape}")
        tables = self._block_tables(scheduled, s, starts + counts)
        token_ids = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slots = np.full(t, -1, np.int32)
        seq_lens = np.zeros(s, np.int32)
        query_start = np.zeros(s + 1, np.int32)
        logits_indices = np.zeros(s, np.int32)
        ends = np.cumsum(counts)  # [n] exclusive end of each request's tokens
        if total == n and (n == 0 or counts.min() == 1):  # decode only: one token per request
            token_ids[:n] = [r.token_ids[0] for r in scheduled]
            pos, rows = starts, np.arange(n)
        else:
            token_ids[:total] = np.fromiter(
                itertools.chain.from_iterable(r.token_ids for r in scheduled), np.int32, total)
            rows = np.repeat(np.arange(n), counts)  # [total] request of each token
            pos = np.arange(total) + np.repeat(starts - (ends - counts), counts)  # [total]
        positions[:total] = pos
        blocks = tables[rows, pos // self.block_size]  # [total]
        slots[:total] = blocks * self.block_size + pos % self.block_size
        seq_lens[:n] = starts + counts
        query_start[1:n + 1] = ends
        query_start[n + 1:] = total
        logits_indices[:n] = ends - 1
        md = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
                               query_start_loc=query_start,
                               max_query_len=1 if shape.decode_only else t)
        return StepInputs(token_ids=token_ids, positions=positions,
                          logits_indices=logits_indices, md=md,
                          prev_source_rows=self._prev_source_rows(scheduled, token_ids, ends,
                                                                  prev_rows))

    def _prev_source_rows(self, scheduled: Sequence[ScheduledRequest], token_ids: np.ndarray,
                          ends: np.ndarray, prev_rows: Mapping[str, int] | None) -> np.ndarray:
        """i32[T]: for each -1 token (only ever a request's last new token) the previous step's
        sampled row that holds it; -1 elsewhere."""
        sources = np.full(token_ids.shape[0], -1, np.int32)
        unknown = np.flatnonzero(token_ids < 0)
        if not unknown.size:
            return sources
        owners = np.searchsorted(ends, unknown, side="right")  # [u] request of each token
        prev_rows = prev_rows or {}
        rows = np.fromiter([prev_rows.get(scheduled[j].req_id, -1) for j in owners.tolist()],
                           np.int32, owners.size)  # [u]
        bad = np.flatnonzero((rows < 0) | (unknown != ends[owners] - 1))
        if bad.size:
            req_id = scheduled[int(owners[bad[0]])].req_id
            raise ValueError(f"request {req_id!r} feeds an unknown token (-1) that the previous "
                             "step did not sample")
        sources[unknown] = rows
        token_ids[unknown] = 0
        return sources

    def _block_tables(self, scheduled: Sequence[ScheduledRequest], num_seqs: int,
                      seq_lens: np.ndarray) -> np.ndarray:
        """i32[S, W] block tables (null block 0 past each request's blocks and in padding rows);
        ``seq_lens`` i64[n] are the requests' context lengths after the step."""
        n = len(scheduled)
        req_ids = [r.req_id for r in scheduled]
        block_ids = [r.block_ids for r in scheduled]
        num_blocks = np.fromiter(map(len, block_ids), np.int64, n)
        if req_ids == self._last_req_ids:  # the same batch as last step: rewrite changed rows
            slots = self._last_slots
            same = np.fromiter(map(operator.is_, block_ids, self._last_block_ids), np.bool_, n)
            for i in np.flatnonzero(~same | (num_blocks != self._last_num_blocks)).tolist():
                self._write_row(self._rows[req_ids[i]], scheduled[i])
        else:
            slots = self._update_rows(scheduled)
        self._last_req_ids, self._last_block_ids = req_ids, block_ids
        self._last_num_blocks, self._last_slots = num_blocks, slots
        self._check_coverage(scheduled, num_blocks, seq_lens)
        tables = np.zeros((num_seqs, self.table_width), np.int32)
        # mode="clip" only skips numpy's buffered bounds check: every slot is a row of the store.
        np.take(self._store["tables"], slots, axis=0, out=tables[:n], mode="clip")
        return tables

    def _update_rows(self, scheduled: Sequence[ScheduledRequest]) -> np.ndarray:
        """Give new requests a row, rewrite changed rows, release the rows of requests gone.
        Returns each request's store row, intp[n]."""
        previous = self._rows
        rows = [previous.pop(r.req_id, None) for r in scheduled]
        self._store.release(row.slot for row in previous.values())  # gone from the batch
        stale = [i for i, (request, row) in enumerate(zip(scheduled, rows))
                 if row is None or request.block_ids is not row.block_ids
                 or len(request.block_ids) != row.num_blocks]
        for i in stale:
            if rows[i] is None:
                rows[i] = _TableRow(self._take_slot())
            self._write_row(rows[i], scheduled[i])
        self._rows = {r.req_id: row for r, row in zip(scheduled, rows)}
        return np.fromiter([row.slot for row in rows], np.intp, len(rows))

    def _take_slot(self) -> int:
        slot = self._store.take()
        self._slot_lens.extend([0] * (self._store.capacity - len(self._slot_lens)))
        return slot

    def _write_row(self, row: _TableRow, request: ScheduledRequest) -> None:
        ids, old_len = request.block_ids, self._slot_lens[row.slot]
        if len(ids) > self.table_width:
            raise ValueError(f"request {request.req_id!r} has {len(ids)} blocks, more than the "
                             f"table width {self.table_width}")
        tables = self._store["tables"]
        tables[row.slot, :len(ids)] = ids
        tables[row.slot, len(ids):old_len] = 0
        self._slot_lens[row.slot] = row.num_blocks = len(ids)
        row.block_ids = ids

    def _check_coverage(self, scheduled: Sequence[ScheduledRequest], num_blocks: np.ndarray,
                        seq_lens: np.ndarray) -> None:
        """Every new token's position must fall inside its request's blocks."""
        short = np.flatnonzero(num_blocks * self.block_size < seq_lens)
        if short.size:
            request = scheduled[int(short[0])]
            raise ValueError(f"request {request.req_id!r} has {len(request.block_ids)} blocks "
                             f"for {request.seq_len} tokens (block_size {self.block_size})")


def pack_step(scheduled: Sequence[ScheduledRequest], shape: StepShape, *, block_size: int,
              table_width: int) -> StepInputs:
    """Numpy StepInputs for ``scheduled`` padded to ``shape`` (one-shot ``StepPacker.pack``)."""
    return StepPacker(block_size=block_size, table_width=table_width).pack(scheduled, shape)
