"""Copy-on-write of KV blocks on the device (beam search forks, ``jaxpaged.core.beam_fork``).

One jitted program copies up to ``max_pairs`` blocks of every layer, K and V, with the pool
donated (updated in place). The pairs of a step are batched into one call, padded with (0, 0)
(the null block onto itself, a no-op), so the program has one shape: compiled at warm-up, never
again.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.models.kv_cache import KVCache


@functools.partial(jax.jit, donate_argnames=("kv_cache",))
def _copy_blocks(kv_cache: KVCache, pairs: jax.Array) -> KVCache:
    """``pairs`` i32[M, 2]: (source, destination) block ids -> the pool with every destination
    block of every layer holding its source's K/V."""
    offsets = jnp.arange(kv_cache.num_layers, dtype=jnp.int32)[:, None] * kv_cache.num_blocks
    src = (offsets + pairs[None, :, 0]).reshape(-1)  # [L * M]
    dst = (offsets + pairs[None, :, 1]).reshape(-1)  # [L * M]
    return dataclasses.replace(kv_cache, k=kv_cache.k.at[dst].set(kv_cache.k[src]),
                               v=kv_cache.v.at[dst].set(kv_cache.v[src]))


class BlockCopier:
    """Runs batched block copies on a pool with one compiled shape."""

    def __init__(self, max_pairs: int) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1, got {max_pairs!r}")
        self.max_pairs = max_pairs
        self._compiled = None

    def warmup(self, kv_cache: KVCache) -> None:
        """Compiles the copy for this pool (its shape, dtype and sharding)."""
        pairs = jax.ShapeDtypeStruct((self.max_pairs, 2), jnp.int32)
        self._compiled = _copy_blocks.lower(kv_cache, pairs).compile()

    def __call__(self, kv_cache: KVCache, copies: list[tuple[int, int]]) -> KVCache:
        if self._compiled is None:  # warm-up skipped (compile_step_shapes="first_use")
            self.warmup(kv_cache)
        for start in range(0, len(copies), self.max_pairs):
            chunk = copies[start:start + self.max_pairs]
            pairs = np.zeros((self.max_pairs, 2), np.int32)  # [M, 2]; (0, 0) pads
            pairs[:len(chunk)] = chunk
            kv_cache = self._compiled(kv_cache, pairs)
        return kv_cache
