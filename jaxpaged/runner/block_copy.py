"""Copy-on-write of KV blocks on the device (beam search forks, ``jaxpaged.core.beam_fork``).

One jitted program copies a batch of blocks of every layer, K and V, with the pool donated
(updated in place). A step's pairs go in one call, padded with (0, 0) (the null block onto
itself, a no-op) to the smallest of a few batch sizes (8, 32, 128, ... up to ``max_pairs``): a
step that copies a handful of blocks does not pay for ``max_pairs`` of them, and start-up compiles
only a few small programs. Every size is compiled at warm-up, never again.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.models.kv_cache import KVCache

_MIN_PAIRS = 8  # the smallest batch of pairs
_GROWTH = 4  # each batch size is this many times the previous one


@functools.partial(jax.jit, donate_argnames=("kv_cache",))
def _copy_blocks(kv_cache: KVCache, pairs: jax.Array) -> KVCache:
    """``pairs`` i32[M, 2]: (source, destination) block ids, destinations distinct (but for the
    (0, 0) padding) -> the pool with every destination block of every layer holding its source's
    K/V."""
    offsets = jnp.arange(kv_cache.num_layers, dtype=jnp.int32)[:, None] * kv_cache.num_blocks
    src = (offsets + pairs[None, :, 0]).reshape(-1)  # [L * M]
    dst = (offsets + pairs[None, :, 1]).reshape(-1)  # [L * M]
    return dataclasses.replace(kv_cache, k=kv_cache.k.at[dst].set(kv_cache.k[src]),
                               v=kv_cache.v.at[dst].set(kv_cache.v[src]))


def pair_batch_sizes(max_pairs: int) -> tuple[int, ...]:
    """The padded batch sizes: ``_MIN_PAIRS`` times powers of ``_GROWTH`` below ``max_pairs``,
    then ``max_pairs`` itself."""
    sizes, size = [], _MIN_PAIRS
    while size < max_pairs:
        sizes.append(size)
        size *= _GROWTH
    return (*sizes, max_pairs)


class BlockCopier:
    """Runs batched block copies on a pool, each batch padded to one of a few compiled sizes."""

    def __init__(self, max_pairs: int) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1, got {max_pairs!r}")
        self.max_pairs = max_pairs
        self.sizes = pair_batch_sizes(max_pairs)
        self._compiled: dict[int, jax.stages.Compiled] = {}  # batch size -> program

    def warmup(self, kv_cache: KVCache) -> None:
        """Compiles the copy of every batch size for this pool (its shape, dtype, sharding)."""
        for size in self.sizes:
            self._program(kv_cache, size)

    def _program(self, kv_cache: KVCache, size: int) -> jax.stages.Compiled:
        program = self._compiled.get(size)
        if program is None:  # warm-up skipped (compile_step_shapes="first_use")
            pairs = jax.ShapeDtypeStruct((size, 2), jnp.int32)
            program = self._compiled[size] = _copy_blocks.lower(kv_cache, pairs).compile()
        return program

    def __call__(self, kv_cache: KVCache, copies: list[tuple[int, int]]) -> KVCache:
        """``copies``: (source, destination) pairs with distinct destinations."""
        for start in range(0, len(copies), self.max_pairs):
            chunk = copies[start:start + self.max_pairs]
            size = next(s for s in self.sizes if s >= len(chunk))
            pairs = np.zeros((size, 2), np.int32)  # [M, 2]; (0, 0) pads
            pairs[:len(chunk)] = chunk
            kv_cache = self._program(kv_cache, size)(kv_cache, pairs)
        return kv_cache
