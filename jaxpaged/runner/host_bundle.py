"""Many small host arrays -> one byte buffer -> one host-to-device copy per jitted call.

A step hands the device a dozen small numpy arrays (token ids, positions, block tables, sampling
parameters...). Passed as separate arguments, each one is its own host-to-device transfer with its
own fixed cost, which on a GPU machine adds up to a large share of a decode step's host time.
``bundle`` packs every leaf of a pytree of numpy arrays into one ``uint8`` buffer (each leaf at a
4-byte aligned offset) and returns a hashable ``BundleLayout``; inside a jitted function
``unbundle`` cuts the buffer back into the original pytree with static slices and bitcasts, which
XLA fuses into the consumers.

The layout is a static argument of the jitted function: steps whose arrays have the same structure,
shapes and dtypes share one layout and so one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_ALIGN = 4  # bytes; every leaf starts at a multiple of this (bitcasts read whole 4-byte words)


@dataclasses.dataclass(frozen=True)
class _LeafSpec:
    offset: int  # byte offset in the buffer
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class BundleLayout:
    """Where each leaf of the bundled pytree lives in the buffer (hashable: a static argument)."""

    treedef: Any  # jax PyTreeDef of the bundled pytree (static fields included)
    leaves: tuple[_LeafSpec, ...]
    nbytes: int  # buffer length, a multiple of _ALIGN


def bundle(tree: Any) -> tuple[np.ndarray, BundleLayout]:
    """Pytree of numpy arrays (or numpy scalars) -> (u8[nbytes] buffer, its layout).

    Leaves may have any dtype of 1, 2 or 4 bytes per item (int32, float32, uint32, bool, ...).
    (Runs for every jitted call of a step, two or three per step: plain attribute reads, no
    numpy reductions per leaf.)"""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [leaf if type(leaf) is np.ndarray else np.asarray(leaf) for leaf in leaves]
    specs, offset = [], 0
    for array in arrays:
        if array.dtype.itemsize not in (1, 2, 4):
            raise ValueError(f"cannot bundle a {array.dtype} array: items of 1, 2 or 4 bytes only")
        specs.append(_LeafSpec(offset, array.shape, array.dtype))
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    buffer = np.empty(offset, np.uint8)
    end = 0
    for spec, array in zip(specs, arrays):
        buffer[end:spec.offset] = 0  # the previous leaf's alignment padding
        end = spec.offset + array.nbytes
        buffer[spec.offset:end] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    buffer[end:] = 0
    return buffer, BundleLayout(treedef, tuple(specs), offset)


def unbundle(buffer: jax.Array, layout: BundleLayout) -> Any:
    """u8[nbytes] buffer (device) -> the pytree ``bundle`` packed, as jax arrays (jit-traceable)."""
    if buffer.shape != (layout.nbytes,):
        raise ValueError(f"buffer of shape {buffer.shape} does not match the layout's "
                         f"{layout.nbytes} bytes")
    return jax.tree.unflatten(layout.treedef, [_leaf(buffer, spec) for spec in layout.leaves])


def _leaf(buffer: jax.Array, spec: _LeafSpec) -> jax.Array:
    raw = buffer[spec.offset:spec.offset + spec.nbytes]  # u8[nbytes]
    itemsize = spec.dtype.itemsize
    if spec.dtype == np.bool_:
        values = raw != 0
    elif itemsize == 1:
        values = jax.lax.bitcast_convert_type(raw, spec.dtype)
    else:
        values = jax.lax.bitcast_convert_type(raw.reshape(-1, itemsize), spec.dtype)
    return jnp.reshape(values, spec.shape)


def unbundle_shapes(layout: BundleLayout) -> Any:
    """The bundled pytree with each array leaf replaced by its shape (no buffer needed)."""
    return jax.tree.unflatten(layout.treedef, [spec.shape for spec in layout.leaves])
