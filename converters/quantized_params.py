"""Quantize a parameter tree's projections (``jaxpaged.models.linear.QUANTIZED_WEIGHTS``).

Each such weight ``w [*in, *out]`` becomes its codes (fp8/int8, output-major ``[*out, *in]``:
``pallas_kernels.quant_matmul``'s layout) plus a sibling ``<name>_scale f32[*out]``; every other
leaf is left as it is. Used when loading an unquantized checkpoint with ``quantization`` (on the
device, one layer's tensor at a time, so the bf16 model never sits on the device whole) and by
``jaxpaged convert --quantization`` (on the host, over the checkpoint's stacked [L, ...] arrays).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxpaged.models.linear import QUANTIZED_WEIGHTS, scale_name
from jaxpaged.pallas_kernels.quant_matmul import quantize_weight

Quantizer = Callable[[Any], tuple[Any, Any]]  # weight -> (codes, scale)


def quantize_tree(tree: dict[str, Any], quantize: Quantizer) -> dict[str, Any]:
    """A new tree with every projection weight replaced by ``quantize``'s codes and scale."""
    out: dict[Any, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = quantize_tree(value, quantize)
        elif key in QUANTIZED_WEIGHTS:
            out[key], out[scale_name(key)] = quantize(value)
        else:
            out[key] = value
    return out


@functools.lru_cache(maxsize=None)
def _device_quantizer(method: str) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    return jax.jit(functools.partial(quantize_weight, quantization=method))


def quantize_on_device(tree: dict[str, Any], method: str, put: Callable[[Any, Any], Any],
                       target: dict[str, Any]) -> dict[str, Any]:
    """Host (or device) tree of one model's layers -> device tree shaped like ``target``.

    ``put(array, target_leaf)`` places an unquantized leaf; a projection weight is placed in its
    own dtype, quantized there, and its unquantized copy dropped before the next one."""
    out: dict[Any, Any] = {}
    for key, t in target.items():
        if isinstance(t, dict):
            out[key] = quantize_on_device(tree[key], method, put, t)
        elif key in QUANTIZED_WEIGHTS and scale_name(key) in target:
            w = jax.device_put(tree[key], t.sharding)  # one device: the codes' placement fits
            codes, scale = _device_quantizer(method)(w)
            del w
            out[key], out[scale_name(key)] = codes, jax.device_put(scale,
                                                                   target[scale_name(key)].sharding)
        elif key.endswith("_scale") and key[:-len("_scale")] in QUANTIZED_WEIGHTS:
            continue  # made with its weight
        else:
            out[key] = put(tree[key], t)
    return out


def quantize_stacked_on_host(tree: dict[str, Any], method: str) -> dict[str, Any]:
    """Checkpoint tree with [L, *in, *out] projection weights -> codes [L, *out, *in] and f32
    scales [L, *out] as numpy (the layers quantized one at a time, on the default device)."""
    quantizer = _device_quantizer(method)

    def quantize(stacked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = [jax.device_get(quantizer(stacked[i])) for i in range(stacked.shape[0])]
        return (np.stack([np.asarray(c) for c, _ in pairs]),
                np.stack([np.asarray(s) for _, s in pairs]))

    return {**tree, "layers": quantize_tree(tree["layers"], quantize)}
