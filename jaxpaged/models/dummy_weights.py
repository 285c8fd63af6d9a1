"""Random weights of a config's shapes, made on the device (vLLM's ``load_format="dummy"``).

For benchmarks: nothing passes through host memory; each parameter is drawn by a small jitted
program straight into its device buffer. Layers share their programs (same shapes), so a 32-layer
model compiles about ten of them, not one per tensor.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

# Small values keep activations finite through many layers of random weights.
DUMMY_STDDEV = 0.02
# Quantized projections: codes ~ N(0, CODE_STDDEV) (well inside fp8's and int8's range) with
# scale DUMMY_STDDEV / CODE_STDDEV, i.e. the same weight values' spread as unquantized.
CODE_STDDEV = 32.0


def dummy_params(target: Any, seed: int = 0) -> Any:
    """``target``: tree of ShapeDtypeStruct (with shardings) -> tree of arrays on the device."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    keys = jax.random.split(jax.random.key(seed), len(leaves_with_paths))
    arrays = [_filler(leaf.shape, jnp.dtype(leaf.dtype), _kind(jax.tree_util.keystr(path)),
                      leaf.sharding)(key)
              for (path, leaf), key in zip(leaves_with_paths, keys)]
    return jax.tree.unflatten(treedef, arrays)


def _kind(path: str) -> str:
    if "norm" in path:
        return "norm"
    return "scale" if path.endswith("_scale']") else "weight"


@functools.lru_cache(maxsize=None)
def _filler(shape: tuple[int, ...], dtype: jnp.dtype, kind: str, sharding):
    """key -> one parameter: ones for norm weights, small normal values otherwise (quantized
    codes and their constant scales for quantized projections)."""
    def fill(key: jax.Array) -> jax.Array:
        if kind == "norm":
            return jnp.ones(shape, dtype)
        if kind == "scale":
            return jnp.full(shape, DUMMY_STDDEV / CODE_STDDEV, dtype)
        if dtype in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)):
            codes = CODE_STDDEV * jax.random.normal(key, shape, jnp.float32)
            if dtype == jnp.dtype(jnp.int8):
                codes = jnp.round(jnp.clip(codes, -127, 127))
            return codes.astype(dtype)
        return (DUMMY_STDDEV * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.jit(fill, out_shardings=sharding)
