"""Quantized-weight matmuls: ``x @ dequantize(w_codes, w_scale)`` without a bf16 copy of ``w``.

Formats (``QUANT_FORMATS``): "fp8" stores each weight as an E4M3 code, "int8" as a signed byte;
both with one f32 scale per output channel (column of ``w``), so that

    w[k, n] ~= code[n, k] * scale[n]        scale[n] = amax_k |w[k, n]| / code_max

and ``x @ w = (x @ code.T) * scale`` exactly: the scale rides on the output columns, one multiply
per output element, never per loaded weight.

Layout: codes are stored output-major, ``[N, K]`` (each output channel's K codes contiguous;
``[*out, *in]`` for multi-axis weights), where an unquantized weight is ``[K, N]``. cuBLASLt's
fp8 GEMM (what XLA's fp8 ``dot_general`` becomes on Hopper) takes only K-contiguous operands
("TN"): with ``[K, N]`` codes XLA transposes the weights in every call, which cost more than the
fp8 GEMM saved (bench/RESULTS.md, 2026-12-08). Hugging Face's pre-quantized checkpoints store
``[out, in]`` too.

Kernels (``MATMUL_KERNELS``); each computes the same product, they differ in where it runs:
- "dequant_xla": ``(x @ code.T.astype(x.dtype)) * scale`` in XLA (the jnp reference), with x padded
  to at least ``DEQUANT_MIN_ROWS`` rows: XLA's GEMM for one or two rows does not fuse the
  conversion of the codes, its GEMM for four does (bench/RESULTS.md, 2026-12-07).
- "w8a16_pallas": Pallas (Triton-style) tiles; each program loads [block_k, block_n] byte codes,
  converts them in registers and accumulates in f32 (bandwidth-bound decode: half the bytes of
  bf16). Optional split-K over ``splits`` programs per output tile for small M.
- "w8a16_gemv": pallas_kernels/quant_gemv.py, CUDA-core GEMV for at most ``GEMV_MAX_ROWS``
  tokens (no tensor-core tile, no transposed 8-bit operand); more tokens take "dequant_xla".
- "w8a8_pallas" (fp8 only): the activations quantized per token to E4M3 (``quantize_rows``), an
  fp8 x fp8 tile dot with f32 accumulation and a per-token x per-channel scale epilogue.
- "w8a8_xla" (fp8 only): the same activation quantization, then XLA's fp8 ``dot_general``
  (a cuBLASLt fp8 GEMM on Hopper; output in x's dtype, f32 sums) and the per-token x
  per-channel scale epilogue in XLA.

Which kernel runs at which token count is ``KERNEL_BY_TOKENS`` (chosen by GPU measurement with
bench/quant_matmul.py; see bench/RESULTS.md). Off the GPU "auto" is the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxpaged.pallas_kernels.backend import (dot_precision, largest_power_of_2_divisor, on_gpu,
                                             splits_that_divide, triton_call, validate_tiles)
from jaxpaged.pallas_kernels.quant_gemv import GemvTuning, gemv_fits, quant_gemv

QUANT_FORMATS = ("fp8", "int8")
WEIGHT_DTYPES = {"fp8": jnp.dtype(jnp.float8_e4m3fn), "int8": jnp.dtype(jnp.int8)}
# Largest code magnitude: e4m3's finite max, and 127 for int8 (symmetric: -128 is never used).
CODE_MAX = {"fp8": 448.0, "int8": 127.0}

MATMUL_KERNELS = ("auto", "dequant_xla", "w8a16_gemv", "w8a16_pallas", "w8a8_pallas", "w8a8_xla")

# Token count M -> kernel, per format: the first row whose bound is >= M wins (None: any M).
# Chosen by GPU measurement (bench/quant_matmul.py, bench/RESULTS.md): no Pallas kernel beat
# XLA's dequantize + dot (x padded to DEQUANT_MIN_ROWS) at decode token counts. Above
# ``DEQUANT_MAX_TOKENS`` (the token count from which model steps compile without XLA's Triton
# GEMMs, runner.compiler_options.TRITON_GEMM_MAX_TOKENS) dequantize + dot becomes a bf16 copy of
# the weights and a bf16 GEMM, slower than bf16; fp8 weights take W8A8's fp8 GEMM there
# (bench/RESULTS.md, 2026-12-08).
DEQUANT_MAX_TOKENS = 16
KERNEL_BY_TOKENS: dict[str, tuple[tuple[int | None, str], ...]] = {
    "fp8": ((DEQUANT_MAX_TOKENS, "dequant_xla"), (None, "w8a8_xla")),
    "int8": ((None, "dequant_xla"),),
}
# "dequant_xla" pads x to this many rows (see the module docstring).
DEQUANT_MIN_ROWS = 4
# Pallas tiles need power-of-2 sizes that divide the matrix (0.11.2 does not mask partial
# blocks): a K or N whose largest power-of-2 divisor is below this takes "dequant_xla".
MIN_TILE = 16


@dataclasses.dataclass(frozen=True)
class MatmulTuning:
    """Tiles of the Pallas kernels. ``block_n`` / ``block_k`` shrink to the largest power of 2
    that divides N / K; ``block_m`` to the next power of 2 >= M (at least 16, ``dot``'s minimum).
    ``splits``: K is cut into this many parts, each a program; partial f32 sums are added in
    XLA (more programs for a decode GEMV whose N alone does not fill the GPU). None: enough
    splits (at most ``MAX_AUTO_SPLITS``) for ``TARGET_PROGRAMS`` programs."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    splits: int | None = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        validate_tiles(self, ("block_m", "block_n", "block_k"), MIN_TILE)


# splits=None: split K until the grid has about two programs per SM of an H100/H200.
TARGET_PROGRAMS = 264
MAX_AUTO_SPLITS = 8

# Tunings by token count, the first whose bound is >= M (same rule as KERNEL_BY_TOKENS).
TUNING_BY_TOKENS: tuple[tuple[int | None, MatmulTuning], ...] = (
    (16, MatmulTuning(block_m=16, block_n=64, block_k=256, splits=None)),
    (64, MatmulTuning(block_m=64, block_n=64, block_k=128)),
    (None, MatmulTuning(block_m=128, block_n=128, block_k=64, num_warps=8)),
)


def _first_by_tokens(table, m: int):
    for bound, value in table:
        if bound is None or m <= bound:
            return value
    raise ValueError(f"no entry for {m} tokens in {table}")


def validate_format(quantization: str) -> None:
    if quantization not in QUANT_FORMATS:
        raise ValueError(f"quantization must be one of {QUANT_FORMATS}, got {quantization!r}")


# --------------------------------------------------------------------------------------------------
# Quantize / dequantize (weights per output channel, activations per token).
# --------------------------------------------------------------------------------------------------

def quantize_weight(w: jax.Array, quantization: str, *, in_axes: int = 1
                    ) -> tuple[jax.Array, jax.Array]:
    """w: [*in, *out] (``in_axes`` leading input axes) -> (codes [*out, *in], f32 scale[*out]).

    One scale per output channel: amax over the input axes / the format's largest code (an
    all-zero channel gets scale 1). int8 codes round to nearest; fp8 codes round to nearest even
    (the cast). The codes come output-major (the module docstring's layout)."""
    validate_format(quantization)
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=tuple(range(in_axes)))  # [*out]
    scale = jnp.where(amax > 0, amax / CODE_MAX[quantization], 1.0).astype(jnp.float32)
    return to_output_major(encode(w32 / scale, quantization), in_axes), scale


def to_output_major(w, in_axes: int = 1):
    """[*in, *out] -> [*out, *in] (jax or numpy arrays; a view of a numpy one)."""
    axes = tuple(range(in_axes, w.ndim)) + tuple(range(in_axes))
    return w.transpose(axes)


def to_input_major(codes, in_axes: int = 1):
    """[*out, *in] -> [*in, *out]: ``to_output_major``'s inverse."""
    out_axes = codes.ndim - in_axes
    axes = tuple(range(out_axes, codes.ndim)) + tuple(range(out_axes))
    return codes.transpose(axes)


def encode(quotient: jax.Array, quantization: str) -> jax.Array:
    """Values already divided by their scale -> codes (clipped to the format's range)."""
    limit = CODE_MAX[quantization]
    clipped = jnp.clip(quotient, -limit, limit)
    if quantization == "int8":
        return jnp.round(clipped).astype(jnp.int8)
    return clipped.astype(WEIGHT_DTYPES["fp8"])


def dequantize_weight(codes: jax.Array, scale: jax.Array, dtype=jnp.float32, *,
                      in_axes: int = 1) -> jax.Array:
    """codes [*out, *in], scale [*out] -> values [*in, *out] in ``dtype``."""
    values = codes.astype(jnp.float32) * scale.reshape(scale.shape + (1,) * in_axes)
    return to_input_major(values, in_axes).astype(dtype)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token fp8 activations: x [M, K] -> (E4M3 codes [M, K], f32 scale [M])."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)  # [M]
    scale = jnp.where(amax > 0, amax / CODE_MAX["fp8"], 1.0)
    return encode(x32 / scale[:, None], "fp8"), scale


# --------------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------------

def choose_kernel(kernel: str, quantization: str, m: int, k: int, n: int) -> str:
    """The kernel that runs for ``kernel`` ("auto": ``KERNEL_BY_TOKENS`` on a CUDA GPU, else the
    reference) at this shape; Pallas kernels fall back to "dequant_xla" when K or N has no
    power-of-2 tile of at least 16."""
    if kernel not in MATMUL_KERNELS:
        raise ValueError(f"quant matmul kernel must be one of {MATMUL_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = (_first_by_tokens(KERNEL_BY_TOKENS[quantization], m) if on_gpu()
                  else "dequant_xla")
    if kernel.startswith("w8a8") and quantization != "fp8":
        raise ValueError(f"kernel {kernel!r} needs fp8 weights, got {quantization!r}")
    if kernel == "w8a16_gemv" and not gemv_fits(m, k, n):
        return "dequant_xla"
    if kernel.endswith("_pallas") and min(largest_power_of_2_divisor(k),
                                          largest_power_of_2_divisor(n)) < MIN_TILE:
        return "dequant_xla"
    return kernel


def quant_matmul(x: jax.Array, codes: jax.Array, scale: jax.Array, *, kernel: str = "auto",
                 tuning: MatmulTuning | GemvTuning | None = None, interpret: bool = False
                 ) -> jax.Array:
    """x [M, K] (bf16/f32) @ dequantize(codes [N, K], scale f32[N]) -> [M, N] in x's dtype.
    ``tuning``: a ``GemvTuning`` for "w8a16_gemv", a ``MatmulTuning`` for the tile kernels."""
    m, k = x.shape
    if codes.ndim != 2 or codes.shape[1] != k or scale.shape != codes.shape[:1]:
        raise ValueError(f"codes must be [N, K={k}] with scale [N], got {codes.shape} and "
                         f"{scale.shape}")
    quantization = _format_of(codes.dtype)
    n = codes.shape[0]
    name = choose_kernel(kernel, quantization, m, k, n)
    if name == "dequant_xla":
        return _dequant_xla(x, codes, scale)
    if name == "w8a8_xla":
        return _w8a8_xla(x, codes, scale)
    if name == "w8a16_gemv":
        if tuning is not None and not isinstance(tuning, GemvTuning):
            raise ValueError(f"w8a16_gemv takes a GemvTuning, got {tuning!r}")
        return quant_gemv(x, codes, scale, tuning=tuning, interpret=interpret)
    if tuning is not None and not isinstance(tuning, MatmulTuning):
        raise ValueError(f"{name} takes a MatmulTuning, got {tuning!r}")
    tuning = tuning or _first_by_tokens(TUNING_BY_TOKENS, m)
    return _pallas_matmul(x, codes, scale, tuning=tuning, activations_fp8=name == "w8a8_pallas",
                          interpret=interpret)


def quant_matmul_reference(x: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """Dequantize then matmul, in XLA: ``(x @ codes.T.astype(x.dtype)) * scale`` with f32 sums.
    x [M, K], codes [N, K], scale f32[N] -> [M, N]."""
    acc = lax.dot_general(x, codes.astype(x.dtype), (((1,), (1,)), ((), ())),
                          precision=dot_precision(x.dtype), preferred_element_type=jnp.float32)
    return (acc * scale).astype(x.dtype)


def _dequant_xla(x: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    m = x.shape[0]
    if m >= DEQUANT_MIN_ROWS:
        return quant_matmul_reference(x, codes, scale)
    padded = jnp.pad(x, ((0, DEQUANT_MIN_ROWS - m), (0, 0)))  # [4, K]
    return quant_matmul_reference(padded, codes, scale)[:m]


def w8a8_reference(x: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """What the W8A8 kernels compute: x quantized per token (``quantize_rows``), dequantized,
    times the dequantized weights, in f32."""
    x_codes, x_scale = quantize_rows(x)
    x_values = x_codes.astype(jnp.float32) * x_scale[:, None]
    w_values = dequantize_weight(codes, scale)
    return jnp.dot(x_values, w_values, precision=lax.Precision.HIGHEST).astype(x.dtype)


def _format_of(dtype) -> str:
    for name, code_dtype in WEIGHT_DTYPES.items():
        if jnp.dtype(dtype) == code_dtype:
            return name
    raise ValueError(f"weight codes must be one of {[d.name for d in WEIGHT_DTYPES.values()]}, "
                     f"got {jnp.dtype(dtype).name}")


def _w8a8_xla(x: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, K], codes [N, K] e4m3 -> [M, N]. The fp8 GEMM writes x's dtype (its sums are f32
    inside; an f32 output would double the bytes the epilogue reads and writes)."""
    x_codes, x_scale = quantize_rows(x)  # [M, K] e4m3, f32[M]
    acc = lax.dot_general(x_codes, codes, (((1,), (1,)), ((), ())),
                          preferred_element_type=x.dtype)  # [M, N]
    return (acc.astype(jnp.float32) * x_scale[:, None] * scale[None, :]).astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# The Pallas kernel (both W8A16 and W8A8).
# --------------------------------------------------------------------------------------------------

def _matmul_kernel(*refs, block_k: int, k_steps: int, activations_fp8: bool, epilogue: bool):
    """One [block_m, block_n] output tile over this program's K range.

    refs: x [bm, Ks] (bf16/f32, or e4m3 codes), [x_scale f32[bm] if activations_fp8],
    codes [bn, Ks], scale f32[bn], out [bm, bn] (``epilogue``: scaled, x's dtype; else raw f32
    partial sums of one split)."""
    if activations_fp8:
        x_ref, xs_ref, w_ref, s_ref, o_ref = refs
    else:
        (x_ref, w_ref, s_ref, o_ref), xs_ref = refs, None
    block_m, block_n = o_ref.shape

    def body(step, acc):
        start = pl.multiple_of(step * block_k, block_k)
        x = x_ref[:, pl.ds(start, block_k)]  # [bm, bk]
        w = w_ref[:, pl.ds(start, block_k)]  # [bn, bk] codes
        if not activations_fp8:
            w = w.astype(x.dtype)  # exact: every int8 / e4m3 code is a bf16 value
        return acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                     precision=dot_precision(x.dtype),
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k_steps, body, jnp.zeros((block_m, block_n), jnp.float32))
    if xs_ref is not None:
        acc = acc * xs_ref[...][:, None]
    if epilogue:
        o_ref[...] = (acc * s_ref[...][None, :]).astype(o_ref.dtype)
    else:
        o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("tuning", "activations_fp8", "interpret"))
def _pallas_matmul(x, codes, scale, *, tuning: MatmulTuning, activations_fp8: bool,
                   interpret: bool):
    m, k = x.shape
    n = codes.shape[0]
    block_m = max(MIN_TILE, min(tuning.block_m, pl.next_power_of_2(m)))
    block_n = min(tuning.block_n, largest_power_of_2_divisor(n))
    tiles = pl.cdiv(m, block_m) * (n // block_n)
    wanted = tuning.splits or min(MAX_AUTO_SPLITS, max(1, pl.cdiv(TARGET_PROGRAMS, tiles)))
    splits = splits_that_divide(k, wanted, MIN_TILE)
    k_part = k // splits
    block_k = min(tuning.block_k, largest_power_of_2_divisor(k_part))
    m_pad = -m % block_m
    out_dtype = x.dtype
    operands = []
    if activations_fp8:
        x_codes, x_scale = quantize_rows(x)
        x = jnp.pad(x_codes, ((0, m_pad), (0, 0)))
        operands = [x, jnp.pad(x_scale, (0, m_pad), constant_values=1.0)]
    else:
        x = jnp.pad(x, ((0, m_pad), (0, 0)))
        operands = [x]
    grid = ((m + m_pad) // block_m, n // block_n, splits)
    in_specs = [pl.BlockSpec((block_m, k_part), lambda i, j, s: (i, s))]
    if activations_fp8:
        in_specs.append(pl.BlockSpec((block_m,), lambda i, j, s: (i,)))
    in_specs += [pl.BlockSpec((block_n, k_part), lambda i, j, s: (j, s)),
                 pl.BlockSpec((block_n,), lambda i, j, s: (j,))]
    epilogue = splits == 1
    if epilogue:
        out_specs = pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j))
        out_shape = jax.ShapeDtypeStruct((m + m_pad, n), out_dtype)
    else:
        out_specs = pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j))
        out_shape = jax.ShapeDtypeStruct((splits, m + m_pad, n), jnp.float32)
    kernel = functools.partial(_matmul_kernel, block_k=block_k, k_steps=k_part // block_k,
                               activations_fp8=activations_fp8, epilogue=epilogue)
    out = triton_call(kernel, name="w8a8_matmul" if activations_fp8 else "w8a16_matmul",
                      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                      num_warps=tuning.num_warps, num_stages=tuning.num_stages,
                      interpret=interpret)(*operands, codes, scale)
    if not epilogue:
        out = (out.sum(axis=0) * scale[None, :]).astype(out_dtype)
    return out[:m] if m_pad else out

