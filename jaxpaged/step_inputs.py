"""Host-side packing of one scheduled step into padded device inputs.

Padding rules (they let every step of a bucket share one compiled program):
  - token axis T: padding tokens have id 0, position 0 and slot -1 (never written);
  - sequence axis S: padding rows have seq_len 0, an empty query range, block table of null
    block 0, and logits index 0 (their logits are computed and ignored).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxpaged.attention_metadata import AttentionMetadata
from jaxpaged.buckets import StepShape
from jaxpaged.scheduler_output import ScheduledRequest


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    token_ids: jax.Array  # i32[T]
    positions: jax.Array  # i32[T]
    logits_indices: jax.Array  # i32[S]: token index of each sequence's last new token
    md: AttentionMetadata


def pack_step(scheduled: list[ScheduledRequest], shape: StepShape, *, block_size: int,
              table_width: int) -> StepInputs:
    """Numpy StepInputs for ``scheduled`` padded to ``shape`` (moved to device by the caller)."""
    t, s = shape.num_tokens, shape.num_seqs
    token_ids = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    slots = np.full(t, -1, np.int32)
    tables = np.zeros((s, table_width), np.int32)
    seq_lens = np.zeros(s, np.int32)
    query_start = np.zeros(s + 1, np.int32)
    logits_indices = np.zeros(s, np.int32)
    offset = 0
    for row, req in enumerate(scheduled):
        n = req.num_new_tokens
        pos = np.arange(req.num_computed_tokens, req.seq_len, dtype=np.int32)
        blocks = np.asarray(req.block_ids, np.int32)
        token_ids[offset:offset + n] = req.token_ids
        positions[offset:offset + n] = pos
        slots[offset:offset + n] = blocks[pos // block_size] * block_size + pos % block_size
        tables[row, :len(blocks)] = blocks
        seq_lens[row] = req.seq_len
        offset += n
        query_start[row + 1] = offset
        logits_indices[row] = offset - 1
    query_start[len(scheduled) + 1:] = offset
    md = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
                           query_start_loc=query_start,
                           max_query_len=1 if shape.decode_only else t)
    return StepInputs(token_ids=token_ids, positions=positions, logits_indices=logits_indices,
                      md=md)
