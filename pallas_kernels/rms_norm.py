"""RMSNorm, alone or fused with the residual add that precedes it, as one kernel.

Math (the model's RMSNorm applied to the sum; ``eps`` static):
    s = x + residual                        # in x.dtype (bf16: added in f32, rounded once)
    n = s32 * rsqrt(mean(s32 * s32, -1) + eps), rounded to x.dtype   (s32 = s in f32)
    normed = weight * n                     # in x.dtype (bf16: multiplied in f32, rounded once)
``fused_add_rms_norm`` returns ``(normed, s)``: ``s`` is the residual stream the next layer adds
to. ``rms_norm`` is the same without a residual (the first layer's input norm, the final norm).
Un-fused, XLA runs this as up to three kernels per norm (the add, the row reduction, the scale);
a batch-1 decode step pays a launch for each.

Not used by the model (measured on an H100, Llama-3-8B, batch-1 decode, bench/RESULTS.md): the
kernel took 2.1 us per norm against ~4.3 us for XLA's three kernels, but XLA had been folding the
norm's scale into the prologue of the next matmul (the QKV projection's Triton GEMM); behind a
custom call it tiled that GEMM as split-K with an extra reduction kernel instead, and the step
got 0.45 ms slower (6.55 against 6.10 ms of device time). Wired in again once the QKV GEMM fed the
RoPE/KV-write kernel (so already split-K), it bought nothing: batch 1 5.62 ms either way, batch 256
20.10 against 20.01 ms, because XLA then split the other GEMMs after each norm kernel too. It stays
a tested building block for a fused norm + projection kernel.

Kernel. One program per block of ``block_rows`` rows: grid ``(ceil(T / block_rows),)``. A program
loads its ``[block_rows, Hp]`` tile of x (and of the residual) once, with ``Hp`` the next power of
2 >= H (Triton tiles need power-of-2 sizes), reduces each row in f32, and stores the normalized
rows (and the sum). Columns past H and rows past T are masked out of every load and store (the
masks exist only when the tile can overhang: H not a power of 2, or T not a multiple of
``block_rows``); masked elements load as 0, so they add nothing to the sum of squares.

Tuning (``choose_rms_norm_tuning``, a static heuristic from T and H; not measured yet): one row
per program until T exceeds ``TARGET_PROGRAMS`` (about two programs per SM of an H100, 132 SMs),
so a decode step (T <= 256) spreads its rows over as many SMs as possible; beyond that, the
power of 2 of rows that keeps about ``TARGET_PROGRAMS`` programs, at most ``MAX_BLOCK_ROWS``
and at most ``MAX_TILE_ELEMENTS`` elements per tile (H = 4096: 4 rows, so 2048 programs at
T = 8192). Warps: one per ``32 * ELEMENTS_PER_THREAD`` tile elements, 1 to ``MAX_WARPS`` (H = 4096,
one row: 8 warps, 16 values per thread).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .backend import is_power_of_2, masked_store, resolve_impl, triton_call

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))

TARGET_PROGRAMS = 256  # ~2 programs per SM of an H100 (132 SMs)
MAX_BLOCK_ROWS = 16
MAX_TILE_ELEMENTS = 16384  # [block_rows, Hp] values one program holds (f32 in registers)
ELEMENTS_PER_THREAD = 16
MAX_WARPS = 16


@dataclasses.dataclass(frozen=True)
class RmsNormTuning:
    """Rows per program and warps per program (static; hashable: a jit static arg)."""

    block_rows: int = 1  # power of 2
    num_warps: int = 4  # power of 2, 1 .. 32

    def __post_init__(self):
        if not is_power_of_2(self.block_rows):
            raise ValueError(f"RmsNormTuning.block_rows must be a power of 2, got "
                             f"{self.block_rows}")
        if not (is_power_of_2(self.num_warps) and self.num_warps <= 32):
            raise ValueError(f"RmsNormTuning.num_warps must be a power of 2 <= 32, got "
                             f"{self.num_warps}")


def _floor_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def choose_rms_norm_tuning(num_tokens: int, hidden_size: int) -> RmsNormTuning:
    """The static heuristic of the module docstring: rows and warps per program from T and H."""
    tile_h = pl.next_power_of_2(hidden_size)
    block_rows = min(_floor_power_of_2(num_tokens // TARGET_PROGRAMS), MAX_BLOCK_ROWS,
                     _floor_power_of_2(MAX_TILE_ELEMENTS // tile_h))
    num_warps = block_rows * tile_h // (32 * ELEMENTS_PER_THREAD)
    return RmsNormTuning(block_rows=block_rows, num_warps=min(max(num_warps, 1), MAX_WARPS))


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------

def _tile_masks(block_rows: int, tile_h: int, num_tokens: int,
                hidden_size: int) -> tuple[jax.Array | None, jax.Array | None]:
    """(tile mask [block_rows, Hp], column mask [Hp]); None where the tile cannot overhang."""
    col_mask = jnp.arange(tile_h) < hidden_size if tile_h != hidden_size else None  # [Hp]
    row_mask = None
    if num_tokens % block_rows:
        row_mask = pl.program_id(0) * block_rows + jnp.arange(block_rows) < num_tokens  # [br]
    if row_mask is None and col_mask is None:
        return None, None
    if row_mask is None:
        tile_mask = jnp.broadcast_to(col_mask[None, :], (block_rows, tile_h))
    elif col_mask is None:
        tile_mask = jnp.broadcast_to(row_mask[:, None], (block_rows, tile_h))
    else:
        tile_mask = row_mask[:, None] & col_mask[None, :]
    return tile_mask, col_mask


def _load(ref, mask: jax.Array | None) -> jax.Array:
    """The whole block; masked-out elements read as 0."""
    if mask is None:
        return ref[...]
    return plt.load(ref, mask=mask, other=0)


def _store(ref, value: jax.Array, mask: jax.Array | None) -> None:
    if mask is None:
        ref[...] = value
    else:
        masked_store(ref, value, mask)


def _rms_norm_kernel(*refs, eps: float, num_tokens: int, hidden_size: int, has_residual: bool):
    """refs: x [br, Hp], (residual [br, Hp],) weight [Hp], normed [br, Hp], (new_residual)."""
    if has_residual:
        x_ref, residual_ref, weight_ref, normed_ref, new_residual_ref = refs
    else:
        x_ref, weight_ref, normed_ref = refs
    block_rows, tile_h = x_ref.shape
    dtype = x_ref.dtype
    tile_mask, col_mask = _tile_masks(block_rows, tile_h, num_tokens, hidden_size)

    s32 = _load(x_ref, tile_mask).astype(jnp.float32)  # [br, Hp]
    if has_residual:
        # XLA's `x + residual`: bf16 operands are added in f32 and rounded once.
        s = (s32 + _load(residual_ref, tile_mask).astype(jnp.float32)).astype(dtype)
        _store(new_residual_ref, s, tile_mask)
        s32 = s.astype(jnp.float32)
    mean_square = jnp.sum(s32 * s32, axis=-1, keepdims=True) / hidden_size  # [br, 1]
    n = (s32 * lax.rsqrt(mean_square + eps)).astype(dtype)  # [br, Hp]
    weight = _load(weight_ref, col_mask).astype(jnp.float32)  # [Hp]
    # A product of two bf16 values is exact in f32: one rounding, as XLA's bf16 multiply.
    normed = (weight[None, :] * n.astype(jnp.float32)).astype(dtype)
    _store(normed_ref, normed, tile_mask)


def _rms_norm_pallas(x, residual, weight, *, eps: float, tuning: RmsNormTuning,
                     interpret: bool):
    """x, residual (or None): [T, H]; weight: [H]. Returns [normed] or [normed, new_residual]."""
    num_tokens, hidden_size = x.shape
    tile_h = pl.next_power_of_2(hidden_size)
    block_rows = tuning.block_rows
    has_residual = residual is not None
    kernel = functools.partial(_rms_norm_kernel, eps=eps, num_tokens=num_tokens,
                               hidden_size=hidden_size, has_residual=has_residual)
    row_spec = pl.BlockSpec((block_rows, tile_h), lambda i: (i, 0))
    weight_spec = pl.BlockSpec((tile_h,), lambda i: (0,))
    row_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    inputs = (x, residual, weight) if has_residual else (x, weight)
    num_outputs = 2 if has_residual else 1
    return triton_call(
        kernel,
        name="fused_add_rms_norm" if has_residual else "rms_norm",
        grid=(pl.cdiv(num_tokens, block_rows),),
        in_specs=[row_spec] * (len(inputs) - 1) + [weight_spec],
        out_specs=[row_spec] * num_outputs,
        out_shape=[row_shape] * num_outputs,
        num_warps=tuning.num_warps,
        num_stages=1,
        interpret=interpret,
    )(*inputs)


# --------------------------------------------------------------------------------------------------
# Public entry points and references
# --------------------------------------------------------------------------------------------------

def _validate(x: jax.Array, residual: jax.Array | None, weight: jax.Array, eps: float) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [T, H], got shape {list(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be one of {[d.name for d in SUPPORTED_DTYPES]}, got "
                         f"{x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.dtype}{list(residual.shape)} must match x "
                         f"{x.dtype}{list(x.shape)}")
    if weight.shape != x.shape[1:] or weight.dtype != x.dtype:
        raise ValueError(f"weight must be {x.dtype}[{x.shape[1]}] (x's dtype and hidden size), "
                         f"got {weight.dtype}{list(weight.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _dispatch(x, residual, weight, *, eps: float, impl: str, interpret: bool,
              tuning: RmsNormTuning | None):
    """Shared body of the public functions: validated; [normed] (+ [new_residual])."""
    _validate(x, residual, weight, eps)
    if resolve_impl(impl) == "reference" or x.shape[0] == 0:
        if residual is None:
            return [rms_norm_reference(x, weight, eps=eps)]
        return list(fused_add_rms_norm_reference(x, residual, weight, eps=eps))
    if tuning is None:
        tuning = choose_rms_norm_tuning(*x.shape)
    return _rms_norm_pallas(x, residual, weight, eps=eps, tuning=tuning, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("eps", "impl", "interpret", "tuning"))
def fused_add_rms_norm(x: jax.Array,  # [T, H] bf16 or f32
                       residual: jax.Array,  # [T, H], x's dtype
                       weight: jax.Array,  # [H], x's dtype
                       *, eps: float, impl: str = "auto", interpret: bool = False,
                       tuning: RmsNormTuning | None = None) -> tuple[jax.Array, jax.Array]:
    """``(rms_norm(x + residual) * weight, x + residual)``, both [T, H], in one kernel.

    ``impl``: "auto" (Pallas on a CUDA GPU, else the jnp reference), "pallas" (with
    ``interpret=True`` it runs on the CPU) or "reference". ``tuning``: None picks
    ``choose_rms_norm_tuning(T, H)``. The sum equals XLA's ``x + residual`` bit for bit; ``normed``
    equals the reference up to the order of the f32 sum of squares (and, on the GPU, the rsqrt).
    """
    normed, new_residual = _dispatch(x, residual, weight, eps=eps, impl=impl,
                                     interpret=interpret, tuning=tuning)
    return normed, new_residual


@functools.partial(jax.jit, static_argnames=("eps", "impl", "interpret", "tuning"))
def rms_norm(x: jax.Array,  # [T, H] bf16 or f32
             weight: jax.Array,  # [H], x's dtype
             *, eps: float, impl: str = "auto", interpret: bool = False,
             tuning: RmsNormTuning | None = None) -> jax.Array:
    """``rms_norm(x) * weight`` [T, H] in one kernel; arguments as ``fused_add_rms_norm``."""
    (normed,) = _dispatch(x, None, weight, eps=eps, impl=impl, interpret=interpret,
                          tuning=tuning)
    return normed


def fused_add_rms_norm_reference(x: jax.Array, residual: jax.Array, weight: jax.Array, *,
                                 eps: float, impl: str = "auto", interpret: bool = False,
                                 tuning: RmsNormTuning | None = None
                                 ) -> tuple[jax.Array, jax.Array]:
    """jnp: the residual add, then the model's RMSNorm of the sum."""
    del impl, interpret, tuning
    _validate(x, residual, weight, eps)
    new_residual = x + residual  # [T, H]
    return rms_norm_reference(new_residual, weight, eps=eps), new_residual


def rms_norm_reference(x: jax.Array, weight: jax.Array, *, eps: float, impl: str = "auto",
                       interpret: bool = False, tuning: RmsNormTuning | None = None) -> jax.Array:
    """jnp: the model's RMSNorm (statistics in f32, normalized value rounded, then the weight)."""
    del impl, interpret, tuning
    _validate(x, None, weight, eps)
    x32 = x.astype(jnp.float32)  # [T, H]
    n = (x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return weight * n
