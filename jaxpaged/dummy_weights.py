"""Random weights of a config's shapes, made on the device (vLLM's ``load_format="dummy"``).

For benchmarks: nothing passes through host memory; each parameter (every layer has its own) is
drawn by one small jitted program straight into its device buffer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# Small values keep activations finite through many layers of random weights.
DUMMY_STDDEV = 0.02


def dummy_params(target: Any, seed: int = 0) -> Any:
    """``target``: tree of ShapeDtypeStruct (with shardings) -> tree of arrays on the device."""
    leaves, treedef = jax.tree.flatten(target)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]]
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    arrays = [_make(leaf, key, "norm" in path) for leaf, key, path in zip(leaves, keys, paths)]
    return jax.tree.unflatten(treedef, arrays)


def _make(leaf: jax.ShapeDtypeStruct, key: jax.Array, is_norm: bool) -> jax.Array:
    fill = jax.jit(lambda k: _draw(k, leaf.shape, leaf.dtype, is_norm),
                   out_shardings=leaf.sharding)
    return fill(key)


def _draw(key, shape, dtype, is_norm: bool) -> jax.Array:
    if is_norm:
        return jnp.ones(shape, dtype)
    return (DUMMY_STDDEV * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
