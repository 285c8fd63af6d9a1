"""The one place that knows the Pallas GPU backend of the kernels (Triton-style, jax 0.11.2).

Pallas on NVIDIA GPUs has two lowerings: Triton (``pl.pallas_call`` + ``jax.experimental.pallas.
triton``), which lowers our block-level kernels with page gathers and runs under ``interpret=True``
on the CPU, and Mosaic GPU (``plgpu.kernel``), the supported long-term path. The Triton lowering is
deprecated upstream and warns on every lowering; this module filters exactly that warning, builds
every ``pallas_call`` of this package, decides where a kernel runs (``resolve_impl``), and holds the
few kernel building blocks all attention kernels share (finite mask value, page gather, online
softmax step), so that a Mosaic GPU port has one file to replace.

Triton rules every kernel here follows (they are not checked in interpret mode; the CUDA lowering
test in tests/test_kernel_lowering.py checks them on the CPU):
- every loaded/stored array and every ``jnp.arange`` has a power-of-2 element count;
- ``dot`` operands are 2-D, share a dtype and have M, N, K >= 16; f32 operands would use TF32 by
  default, so f32 kernels ask for ``Precision.HIGHEST``;
- in-register values are never sliced or gathered: slice the *ref* instead;
- partial blocks are not bounds-checked on 0.11.2: arrays are padded so every access is in bounds.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxpaged.pallas_kernels.kv_quant import validate_query_dtype

TRITON_DEPRECATION_TEXT = "The Pallas Triton backend is deprecated"

# Finite "minus infinity" for masked logits: a fully masked row then gives exp(MASK - MASK) = 1
# instead of inf - inf = NaN. The value the JAX built-in kernels use.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)

IMPLS = ("auto", "pallas", "reference")


def silence_triton_deprecation() -> None:
    """Ignore JAX's Triton-backend deprecation warning, matched by its exact text and category.

    The warning is emitted when XLA lowers the kernel, which usually happens in the caller's
    outermost ``jit``, outside any scope of ours; so the filter is process-wide. Idempotent.
    """
    warnings.filterwarnings(
        "ignore", message=re.escape(TRITON_DEPRECATION_TEXT), category=DeprecationWarning)


silence_triton_deprecation()


def on_gpu() -> bool:
    """True when JAX's default backend is a CUDA GPU (where the Triton kernels run natively)."""
    if jax.default_backend() != "gpu":
        return False
    version = jax.devices()[0].client.platform_version.lower()
    return "rocm" not in version and "hip" not in version


def resolve_impl(impl: str) -> str:
    """Map the public ``impl`` switch to "pallas" or "reference" ("auto": Pallas on a CUDA GPU)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if on_gpu() else "reference"
    return impl


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def largest_power_of_2_divisor(n: int) -> int:
    return n & -n


def splits_that_divide(k: int, splits: int, min_part: int) -> int:
    """The largest split count <= ``splits`` that cuts ``k`` into equal parts that are whole
    multiples of ``min_part`` (1 if none)."""
    for s in range(min(splits, k // min_part), 0, -1):
        if k % s == 0 and (k // s) % min_part == 0:
            return s
    return 1


def require_power_of_2(name: str, value: int) -> None:
    """Triton arrays need power-of-2 sizes: reject other sizes clearly, before lowering does."""
    if not is_power_of_2(value):
        raise ValueError(f"{name} must be a power of 2 for the Pallas kernel, got {value}")


def triton_call(kernel: Callable[..., None], *, name: str, grid: tuple[int, ...],
                in_specs: Sequence[pl.BlockSpec], out_specs: Any, out_shape: Any,
                num_warps: int, num_stages: int, interpret: bool,
                input_output_aliases: dict[int, int] | None = None) -> Callable[..., Any]:
    """``pl.pallas_call`` on the Triton-style lowering, with its compiler parameters."""
    return pl.pallas_call(
        kernel,
        name=name,
        grid=grid,
        in_specs=list(in_specs),
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=input_output_aliases or {},
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )


def masked_store(ref: Any, value: jax.Array, mask: jax.Array) -> None:
    """Store ``value`` into ``ref`` where ``mask`` (broadcast to ``value``'s shape) is True."""
    plt.store(ref, value, mask=jnp.broadcast_to(mask, value.shape))


# --------------------------------------------------------------------------------------------------
# Kernel building blocks shared by the attention kernels (backend-neutral math on loaded values).
# --------------------------------------------------------------------------------------------------

def dot_precision(dtype: jnp.dtype) -> lax.Precision:
    """f32 tiles ask for full precision (the Triton default would be TF32); bf16 needs nothing."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def matmul_f32(a: jax.Array, b: jax.Array, *, transpose_b: bool,
               precision: lax.Precision) -> jax.Array:
    """``a @ b`` (or ``a @ b.T``) with an f32 result; 2-D operands of one dtype."""
    contract_b = 1 if transpose_b else 0
    return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def gather_pages(pool_ref: Any, page_ids: jax.Array) -> jax.Array:
    """Load ``len(page_ids)`` whole pages of one kv head and lay them end to end.

    pool_ref: [P, page_size, D] (the kv-head dim is squeezed by the BlockSpec); page_ids: i32[n].
    Returns [n * page_size, D].
    """
    pages = pool_ref[page_ids]  # [n, page_size, D]
    n, page_size, head_dim = pages.shape
    return pages.reshape(n * page_size, head_dim)


def scaled_logits(s: jax.Array, *, sm_scale: float, soft_cap: float | None,
                  k_scale: jax.Array | None = None) -> jax.Array:
    """Raw scores -> logits in base 2: ``log2(e) * cap(sm_scale * k_scale * s)`` (softmax uses
    exp2). ``k_scale``: an fp8 pool's K scale (f32 scalar) folded into the one multiply per score
    that is there anyway (``kv_quant``); None for other pools."""
    scale = sm_scale if k_scale is None else k_scale * sm_scale
    if soft_cap is None:
        return s * (scale * LOG2_E)
    return (soft_cap * LOG2_E) * jnp.tanh(s * (scale / soft_cap))


def normalized_output(acc: jax.Array, l: jax.Array, v_scale: jax.Array | None) -> jax.Array:
    """f32[M, D] output rows ``acc / l`` (rows with ``l == 0``, i.e. nothing attended, give zeros);
    an fp8 pool's ``v_scale`` rides on the per-row factor: ``acc * (v_scale / l)``."""
    l = jnp.where(l == 0.0, 1.0, l)
    if v_scale is None:
        return acc / l[:, None]
    return acc * (v_scale / l)[:, None]


def online_softmax_step(acc: jax.Array, m_prev: jax.Array, l_prev: jax.Array,
                        logits2: jax.Array, v: jax.Array, *,
                        precision: lax.Precision) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One flash-attention update with base-2 logits (masked entries hold ``MASK_VALUE``).

    acc: f32[M, D] unnormalized output; m_prev, l_prev: f32[M] running max / denominator;
    logits2: f32[M, N]; v: [N, D] (rows that may hold garbage must already be zeroed).
    """
    m_new = jnp.maximum(m_prev, logits2.max(axis=-1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(logits2 - m_new[:, None])  # [M, N]
    l_new = alpha * l_prev + p.sum(axis=-1)
    acc = acc * alpha[:, None] + matmul_f32(p.astype(v.dtype), v, transpose_b=False,
                                            precision=precision)
    return acc, m_new, l_new


def initial_softmax_state(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(acc, m, l) before the first KV block: zeros, ``MASK_VALUE``, zeros."""
    return (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


# --------------------------------------------------------------------------------------------------
# Shared input handling of the public attention entry points and their references.
# --------------------------------------------------------------------------------------------------

def block_tables_within_context(block_tables: jax.Array, seq_lens: jax.Array,
                                page_size: int) -> jax.Array:
    """Replace table entries past each sequence's last page by page 0 (they may hold anything).

    block_tables: i32[S, W]; seq_lens: i32[S]. Returns i32[S, W].
    """
    num_pages = (seq_lens + page_size - 1) // page_size  # [S]
    page_index = jnp.arange(block_tables.shape[1], dtype=jnp.int32)  # [W]
    return jnp.where(page_index[None, :] < num_pages[:, None], block_tables, 0)


def validate_paged_kv(k_cache: jax.Array, v_cache: jax.Array, block_tables: jax.Array,
                      seq_lens: jax.Array, *, num_q_heads: int, head_dim: int,
                      q_dtype: jnp.dtype) -> None:
    """ValueErrors for pool/table/length inputs shared by every attention entry point."""
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [P, block_size, Hkv, D], got shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {v_cache.shape} {v_cache.dtype} must match k_cache "
                         f"{k_cache.shape} {k_cache.dtype}")
    _, _, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != k_cache head_dim {cache_head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num q heads {num_q_heads} must be a multiple of num kv heads "
                         f"{num_kv_heads}")
    validate_query_dtype(q_dtype, k_cache.dtype)
    if block_tables.ndim != 2 or block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be i32[S, W], got {block_tables.dtype}"
                         f"{list(block_tables.shape)}")
    if seq_lens.shape != block_tables.shape[:1] or seq_lens.dtype != jnp.int32:
        raise ValueError(f"seq_lens must be i32[{block_tables.shape[0]}], got "
                         f"{seq_lens.dtype}{list(seq_lens.shape)}")


def validate_scales(sm_scale: float, soft_cap: float | None) -> None:
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be > 0, got {sm_scale}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be None or > 0, got {soft_cap}")
