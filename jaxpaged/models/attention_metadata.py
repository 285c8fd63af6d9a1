"""Per-step attention metadata: the explicit pytree that tells attention where each token lives.

One step packs the new tokens of many sequences along a single token axis (a ragged batch):
sequence ``s`` owns tokens ``query_start_loc[s]:query_start_loc[s + 1]``; its context after the step
is ``seq_lens[s]`` tokens, the last ``q_len`` of which are the new ones. So the ``i``-th new token of
sequence ``s`` sits at absolute position ``seq_lens[s] - q_len + i`` and attends causally to context
positions ``0 .. seq_lens[s] - q_len + i``. One layout covers chunked prefill, prefix-cache hits and
decode (``q_len == 1``).

Block ids here are *layer-local* (``0 .. num_blocks - 1``; block 0 is the null block used for
padding); attention offsets them into the layer-flattened pool (see ``kv_cache.KVCache``).
Padding: token slots past ``query_start_loc[-1]`` carry ``slot_mapping == -1`` (never written), and
padding sequence rows have ``seq_lens == 0`` and an empty query range.

Decode batches (``max_query_len == 1`` and ``T == S``) are packed one token per sequence in order:
token ``s`` is sequence ``s``'s new token (padding rows own the padding tokens). Attention relies
on it (``is_decode_batch``) to use the decode kernel's rows as the output without a gather.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array  # i32[T]: block_id * block_size + offset of each new token, -1 = padding
    block_tables: jax.Array  # i32[S, W]: layer-local block ids of each sequence, unused entries 0
    seq_lens: jax.Array  # i32[S]: context length after this step (cached + new), 0 for padding rows
    query_start_loc: jax.Array  # i32[S + 1]: offsets of each sequence's new tokens in the token axis
    # Upper bound on any sequence's number of new tokens this step (static): 1 means a decode-only
    # batch, which lets attention take its decode path.
    max_query_len: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_batch(self) -> bool:
        """One new token per sequence, token ``s`` belonging to sequence ``s`` (module doc)."""
        return self.max_query_len == 1 and self.num_tokens == self.num_seqs
