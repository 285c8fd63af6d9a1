"""The global paged KV pool.

All layers share one pool array per K and V, flattened over layers:
``k[layer * num_blocks + block, offset, kv_head, :]``. Kernels therefore see a plain
``[pages, block_size, Hkv, D]`` pool and stay layer-agnostic; the model offsets block tables and
slots by ``layer * num_blocks`` (``jaxpaged.models.attention``). Block 0 of every layer is the null block that
padding rows point at. Pools over 4 GiB are addressed with 64-bit offsets by the Triton lowering.

An fp8 pool (``dtype`` float8_e4m3fn or float8_e5m2) also holds per-layer K and V scales: value =
code * scale (``jaxpaged.pallas_kernels.kv_quant``); ``zeros`` starts them at 1.0. Other pools
hold none.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpaged.pallas_kernels.kv_quant import is_fp8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [num_layers * num_blocks, block_size, num_kv_heads, head_dim]
    v: jax.Array  # [num_layers * num_blocks, block_size, num_kv_heads, head_dim]
    num_layers: int = dataclasses.field(metadata=dict(static=True))
    num_blocks: int = dataclasses.field(metadata=dict(static=True))  # per layer, incl. null block 0
    k_scale: jax.Array | None = None  # f32[num_layers]: fp8 pools only
    v_scale: jax.Array | None = None  # f32[num_layers]

    def scales(self, layer: int) -> dict[str, jax.Array | None]:
        """The kernels' ``k_scale``/``v_scale`` keyword arguments for one layer."""
        if self.k_scale is None:
            return dict(k_scale=None, v_scale=None)
        return dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer])

    def with_scales(self, k_scale, v_scale) -> "KVCache":
        """The same pool with per-layer scales (``[num_layers]`` each; fp8 pools only)."""
        if self.k_scale is None:
            raise ValueError(f"K/V scales need an fp8 pool, this one is {self.k.dtype}")
        # [num_layers] each, placed where the pool's scales are
        k_scale = jax.device_put(jnp.asarray(k_scale, jnp.float32), self.k_scale.sharding)
        v_scale = jax.device_put(jnp.asarray(v_scale, jnp.float32), self.v_scale.sharding)
        if k_scale.shape != (self.num_layers,) or v_scale.shape != (self.num_layers,):
            raise ValueError(f"K/V scales must have shape ({self.num_layers},), got "
                             f"{k_scale.shape} and {v_scale.shape}")
        return dataclasses.replace(self, k_scale=k_scale, v_scale=v_scale)

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @classmethod
    def zeros(cls, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
              head_dim: int, dtype: jnp.dtype, pool_sharding: jax.sharding.Sharding | None = None,
              scale_sharding: jax.sharding.Sharding | None = None) -> "KVCache":
        """A zeroed pool, made in place on its devices when shardings are given (tensor
        parallelism: ``models.sharding.kv_cache_shardings``), else on the default device."""
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}")
        shape = (num_layers * num_blocks, block_size, num_kv_heads, head_dim)
        scales = [jnp.ones((num_layers,), jnp.float32, device=scale_sharding)
                  if is_fp8(dtype) else None
                  for _ in range(2)]  # two buffers: the step donates each once
        return cls(k=jnp.zeros(shape, dtype, device=pool_sharding),
                   v=jnp.zeros(shape, dtype, device=pool_sharding),
                   num_layers=num_layers, num_blocks=num_blocks, k_scale=scales[0],
                   v_scale=scales[1])

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: jnp.dtype) -> int:
        """Bytes of K plus V that one block id costs across all layers."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize
