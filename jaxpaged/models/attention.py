"""The model's one attention entry point: RoPE, the K/V write into the paged pool, then attention.

The model calls ``paged_attention`` per layer with the layer index and its fused QKV projection;
this module moves the step's layer-local slots and block ids into the layer-flattened pool
(``kv_cache`` module doc) and dispatches to the kernels in ``jaxpaged.pallas_kernels``: one rotates q
and k and stores K/V, one attends. ``impl``: "pallas" (the Pallas kernels, a CUDA GPU), "xla"
(the jnp K/V write and the XLA attention path that loops over the pages a step uses: the CPU),
"reference" (the dense jnp references: tests), "auto" (Pallas on a CUDA GPU, else "xla").

``PagedAttention`` is what the model holds: the implementation switch and, under tensor
parallelism, the mesh. There the kernels run per shard under ``shard_map`` on each device's own
heads (they stay single-device code): the QKV projection arrives split over KV heads, each device
writes its heads' K/V into its part of the pool and attends with its query heads, and the output
leaves split over query heads for the row-parallel O projection.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxpaged.models.attention_metadata import AttentionMetadata
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.sharding import kv_cache_specs
from jaxpaged.models.tensor_parallel import TP_AXIS
from jaxpaged.pallas_kernels.backend import on_gpu
from jaxpaged.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from jaxpaged.pallas_kernels.ragged_paged_attention_xla import ragged_paged_attention_xla
from jaxpaged.pallas_kernels.rope_kv_write import rope_and_write_kv

ATTENTION_IMPLS = ("auto", "pallas", "xla", "reference")


def resolve_attention_impl(impl: str) -> str:
    """``impl`` with "auto" resolved: "pallas" on a CUDA GPU, else "xla"."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if on_gpu() else "xla"
    return impl


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
    impl = resolve_attention_impl(impl)
    kernel_impl = "reference" if impl == "xla" else impl  # the K/V write has no XLA variant
    block_offset = layer * kv_cache.num_blocks
    # A constant operand, not a static argument: every layer runs the same compiled kernel.
    slot_offset = jnp.int32(block_offset * kv_cache.block_size)
    scales = kv_cache.scales(layer)  # fp8 pools: this layer's K/V scales, operands as well
    q, k_pool, v_pool = rope_and_write_kv(qkv, cos, sin, kv_cache.k, kv_cache.v,
                                          md.slot_mapping, slot_offset, **scales, impl=kernel_impl)
    tables = md.block_tables + block_offset
    if impl == "xla":
        out = ragged_paged_attention_xla(q, k_pool, v_pool, tables, md.seq_lens,
                                         md.query_start_loc, **scales, sm_scale=sm_scale,
                                         soft_cap=soft_cap, max_query_len=md.max_query_len)
    else:
        out = ragged_paged_attention(q, k_pool, v_pool, tables, md.seq_lens, md.query_start_loc,
                                     **scales, sm_scale=sm_scale, soft_cap=soft_cap,
                                     max_query_len=md.max_query_len,
                                     one_token_per_sequence=md.is_decode_batch, impl=kernel_impl)
    return out, dataclasses.replace(kv_cache, k=k_pool, v=v_pool)


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """``paged_attention`` with the model's implementation switch, per shard when ``mesh`` is
    set (module doc). Static: part of the model's graph."""

    impl: str = "auto"
    mesh: Mesh | None = None

    def __call__(self, qkv: jax.Array,  # [T, Hkv, G + 2, D]
                 cos: jax.Array, sin: jax.Array, kv_cache: KVCache, layer: int,
                 md: AttentionMetadata, *, sm_scale: float,
                 soft_cap: float | None = None) -> tuple[jax.Array, KVCache]:
        attend = functools.partial(_attend, layer=layer, sm_scale=sm_scale, soft_cap=soft_cap,
                                   impl=self.impl)
        if self.mesh is None:
            return attend(qkv, cos, sin, kv_cache, md)
        heads = PartitionSpec(None, TP_AXIS)  # axis 1: KV heads of qkv, query heads of the output
        pool = kv_cache_specs(kv_cache)
        per_shard = jax.shard_map(attend, mesh=self.mesh,
                                  in_specs=(heads, PartitionSpec(), PartitionSpec(), pool,
                                            PartitionSpec()),
                                  out_specs=(heads, pool), check_vma=False)
        return per_shard(qkv, cos, sin, kv_cache, md)

    def __repr__(self) -> str:  # stable across processes: it keys compiled programs
        ids = getattr(self.mesh, "device_ids", None)  # an AbstractMesh (lowering) has none
        devices = None if self.mesh is None else (self.mesh.shape_tuple if ids is None
                                                  else ids.tolist())
        return f"PagedAttention(impl={self.impl!r}, devices={devices})"


def _attend(qkv, cos, sin, kv_cache, md, *, layer, sm_scale, soft_cap, impl):
    return paged_attention(qkv, cos, sin, kv_cache, layer, md, sm_scale=sm_scale,
                           soft_cap=soft_cap, impl=impl)
