"""The model's one attention entry point: RoPE, the K/V write into the paged pool, then attention.

The model calls ``paged_attention`` per layer with the layer index and its fused QKV projection;
this module moves the step's layer-local slots and block ids into the layer-flattened pool
(``kv_cache`` module doc) and dispatches to the kernels in ``jaxpaged.pallas_kernels`` (Pallas on
an NVIDIA GPU, their jnp references elsewhere): one kernel rotates q and k and stores K/V, one
attends.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpaged.models.attention_metadata import AttentionMetadata
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from jaxpaged.pallas_kernels.rope_kv_write import rope_and_write_kv

ATTENTION_IMPLS = ("auto", "pallas", "reference")


def paged_attention(qkv: jax.Array,  # [T, Hkv, G + 2, D]: per kv head its G queries, K, V
                    cos: jax.Array,  # f32[T, D]: RoPE of each token's position
                    sin: jax.Array,  # f32[T, D]
                    kv_cache: KVCache,
                    layer: int,  # which layer's part of the pool
                    md: AttentionMetadata,
                    *,
                    sm_scale: float,
                    soft_cap: float | None = None,
                    impl: str = "auto") -> tuple[jax.Array, KVCache]:
    """Returns the attention output [T, Hq, D] and the pool with this step's K/V written."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    block_offset = layer * kv_cache.num_blocks
    # A constant operand, not a static argument: every layer runs the same compiled kernel.
    slot_offset = jnp.int32(block_offset * kv_cache.block_size)
    scales = kv_cache.scales(layer)  # fp8 pools: this layer's K/V scales, operands as well
    q, k_pool, v_pool = rope_and_write_kv(qkv, cos, sin, kv_cache.k, kv_cache.v,
                                          md.slot_mapping, slot_offset, **scales, impl=impl)
    out = ragged_paged_attention(q, k_pool, v_pool, md.block_tables + block_offset, md.seq_lens,
                                 md.query_start_loc, **scales, sm_scale=sm_scale,
                                 soft_cap=soft_cap, max_query_len=md.max_query_len,
                                 one_token_per_sequence=md.is_decode_batch, impl=impl)
    return out, dataclasses.replace(kv_cache, k=k_pool, v=v_pool)
