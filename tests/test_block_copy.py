"""Batched copy-on-write of KV blocks (``jaxpaged.runner.block_copy``) on a small random pool."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.engine.beam_search import _last_copy_per_destination
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.runner.block_copy import BlockCopier, pair_batch_sizes

NUM_LAYERS, NUM_BLOCKS = 2, 40


def random_pool(seed: int) -> KVCache:
    pool = KVCache.zeros(num_layers=NUM_LAYERS, num_blocks=NUM_BLOCKS, block_size=4,
                         num_kv_heads=2, head_dim=8, dtype=jnp.float32)
    rng = np.random.default_rng(seed)
    return KVCache(k=jnp.asarray(rng.standard_normal(pool.k.shape), jnp.float32),
                   v=jnp.asarray(rng.standard_normal(pool.v.shape), jnp.float32),
                   num_layers=NUM_LAYERS, num_blocks=NUM_BLOCKS)


def expected_after(pool: KVCache, copies: list[tuple[int, int]]) -> tuple[np.ndarray, ...]:
    """The copies run one at a time on host arrays, every layer."""
    k, v = np.array(pool.k), np.array(pool.v)
    for src, dst in copies:
        for layer in range(NUM_LAYERS):
            base = layer * NUM_BLOCKS
            k[base + dst], v[base + dst] = k[base + src], v[base + src]
    return k, v


def test_batch_sizes():
    assert pair_batch_sizes(1) == (1,)
    assert pair_batch_sizes(8) == (8,)
    assert pair_batch_sizes(100) == (8, 32, 100)
    assert pair_batch_sizes(16) == (8, 16)
    with pytest.raises(ValueError, match="max_pairs"):
        BlockCopier(0)


@pytest.fixture(scope="module")
def copier() -> BlockCopier:
    copier = BlockCopier(max_pairs=16)
    copier.warmup(random_pool(0))  # sizes 8 and 16, compiled once for every case
    return copier


@pytest.mark.parametrize("num_copies", [1, 9, 21])
def test_copies_every_layer_and_nothing_else(copier, num_copies):
    """Sources may repeat; destinations are distinct; 21 pairs take two calls (16 pairs, then 5
    padded to 8 with null-block no-ops)."""
    pool = random_pool(num_copies)
    rng = np.random.default_rng(100 + num_copies)
    dsts = rng.choice(np.arange(1, NUM_BLOCKS), num_copies, replace=False)
    srcs = rng.choice(np.setdiff1d(np.arange(1, NUM_BLOCKS), dsts), num_copies)
    copies = [(int(s), int(d)) for s, d in zip(srcs, dsts)]
    want_k, want_v = expected_after(pool, copies)
    out = copier(pool, copies)
    np.testing.assert_array_equal(np.asarray(out.k), want_k)
    np.testing.assert_array_equal(np.asarray(out.v), want_v)


def test_a_step_keeps_the_last_copy_per_destination():
    """A later group's fork may reuse a block an earlier group's copy targeted (that group was
    preempted): the later copy wins, as when the copies ran one by one."""
    copies = [(3, 7), (4, 8), (5, 7)]
    assert sorted(_last_copy_per_destination(copies)) == [(4, 8), (5, 7)]
