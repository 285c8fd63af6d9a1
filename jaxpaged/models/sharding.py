"""Where each weight and the KV pool live under tensor parallelism: logical axes and their rules.

Every parameter of ``jaxpaged.models.llama`` names its axes logically (as jax-llm-examples'
ShardingRules and MaxText's logical axis rules do); ``LOGICAL_AXIS_RULES`` maps the logical axes
that are split onto the mesh's "tp" axis, and every other axis is replicated:

  attn.wqkv     [embed, kv_heads, qkv, head_dim]   column-parallel by KV head groups
  attn.wo       [q_heads, embed]                   row-parallel (rows are head-major): all-reduce
  mlp.w_gate_up [embed, gate_up, mlp]              column-parallel by MLP columns
  mlp.w_down    [mlp, embed]                       row-parallel: all-reduce
  embed         [vocab, embed], lm_head [embed, vocab]   split by vocabulary when it divides
  norms, the row-parallel biases                   replicated

A parameter without a rule is a ValueError naming it, so a new weight cannot be silently
replicated (or mis-split).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.tensor_parallel import TP_AXIS, TensorParallel

# Parameter name (the last key of its path in the model's state) -> logical axes.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "weight": ("norm",),  # RMSNorm
    "wqkv": ("embed", "kv_heads", "qkv", "head_dim"),
    "bqkv": ("kv_heads", "qkv", "head_dim"),
    "wo": ("q_heads", "embed"),
    "bo": ("embed",),
    "w_gate_up": ("embed", "gate_up", "mlp"),
    "b_gate_up": ("gate_up", "mlp"),
    "w_down": ("mlp", "embed"),
    "b_down": ("embed",),
}

# Logical axes split over the mesh; the rest are replicated.
LOGICAL_AXIS_RULES: dict[str, str] = {"vocab": TP_AXIS, "kv_heads": TP_AXIS, "q_heads": TP_AXIS,
                                      "mlp": TP_AXIS}

# The KV pool [layers * blocks, block_size, kv_heads, head_dim]: split over KV heads.
KV_POOL_AXES = ("pages", "block", "kv_heads", "head_dim")


def logical_spec(axes: tuple[str, ...], shape: tuple[int, ...], size: int) -> PartitionSpec:
    """The mesh spec of an array with these logical axes. A split axis that does not divide by
    ``size`` is replicated when it is the vocabulary (vLLM pads it; a replicated head is the
    simple equivalent) and a ValueError otherwise (``TensorParallel.check`` rules those out)."""
    spec = []
    for axis, dim in zip(axes, shape, strict=True):
        mesh_axis = LOGICAL_AXIS_RULES.get(axis)
        if mesh_axis is not None and dim % size:
            if axis != "vocab":
                raise ValueError(f"{axis} axis of size {dim} is not divisible by "
                                 f"tensor_parallel_size={size}")
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_axes(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The logical axes of the parameter at ``path`` (keys of the model's pure-dict state)."""
    name = str(path[-1])
    if name not in PARAM_AXES:
        raise ValueError(f"no sharding rule for parameter {'.'.join(map(str, path))}")
    return PARAM_AXES[name]


def param_shardings(params: Any, tp: TensorParallel) -> Any:
    """A tree of NamedShardings for a tree of arrays (or ShapeDtypeStructs) keyed like the
    model's state (``layers`` keyed 0..L-1)."""
    def one(path, leaf) -> NamedSharding:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        return NamedSharding(tp.mesh, logical_spec(param_axes(keys), leaf.shape, tp.size))
    return jax.tree_util.tree_map_with_path(one, params)


def kv_cache_shardings(mesh: Mesh | None) -> dict[str, NamedSharding | None]:
    """``KVCache.zeros``'s placement keywords: K and V split over KV heads, the fp8 scales
    replicated; the default device when there is no mesh."""
    if mesh is None:
        return dict(pool_sharding=None, scale_sharding=None)
    pool = PartitionSpec(*(LOGICAL_AXIS_RULES.get(axis) for axis in KV_POOL_AXES))
    return dict(pool_sharding=NamedSharding(mesh, pool),
                scale_sharding=NamedSharding(mesh, PartitionSpec()))


def replicated(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """``x`` as one whole copy on every device of ``mesh`` (inside a jitted program; gathered
    if it was split); unchanged without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))


def kv_cache_specs(kv_cache: KVCache) -> KVCache:
    """``kv_cache`` with PartitionSpecs for leaves: the ``shard_map`` specs of the pool (K and V
    split over heads, per-layer fp8 scales replicated)."""
    pool = PartitionSpec(*(LOGICAL_AXIS_RULES.get(axis) for axis in KV_POOL_AXES))
    scale = None if kv_cache.k_scale is None else PartitionSpec()
    return KVCache(k=pool, v=pool, num_layers=kv_cache.num_layers,
                   num_blocks=kv_cache.num_blocks, k_scale=scale, v_scale=scale)
