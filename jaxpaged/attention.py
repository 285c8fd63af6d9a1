"""The model's one attention entry point: write the step's K/V into the paged pool, then attend.

The model calls ``paged_attention`` per layer with the layer index; this module moves the step's
layer-local block ids into the layer-flattened pool (``kv_cache.layer_view``) and dispatches to the
kernels in ``jaxpaged.pallas_kernels`` (Pallas on an NVIDIA GPU, their jnp references elsewhere).
"""

from __future__ import annotations

import dataclasses

import jax

from jaxpaged.attention_metadata import AttentionMetadata
from jaxpaged.kv_cache import KVCache, layer_view
from jaxpaged.pallas_kernels.kv_write import write_kv
from jaxpaged.pallas_kernels.ragged_paged_attention import ragged_paged_attention

ATTENTION_IMPLS = ("auto", "pallas", "reference")


def paged_attention(q: jax.Array,  # [T, Hq, D]
                    k: jax.Array,  # [T, Hkv, D] new keys of this step
                    v: jax.Array,  # [T, Hkv, D] new values of this step
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
    lmd = layer_view(md, layer, kv_cache.num_blocks, kv_cache.block_size)
    k_pool, v_pool = write_kv(kv_cache.k, kv_cache.v, k.astype(kv_cache.k.dtype),
                              v.astype(kv_cache.v.dtype), lmd.slot_mapping, impl=impl)
    out = ragged_paged_attention(q, k_pool, v_pool, lmd.block_tables, lmd.seq_lens,
                                 lmd.query_start_loc, sm_scale=sm_scale, soft_cap=soft_cap,
                                 max_query_len=md.max_query_len, impl=impl)
    return out, dataclasses.replace(kv_cache, k=k_pool, v=v_pool)
