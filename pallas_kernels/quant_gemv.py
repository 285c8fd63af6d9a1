"""Weight-only quantized GEMV for decode-sized token counts: ``x @ dequantize(codes, scale)``.

A decode step multiplies a few token rows by every weight once, so its matmuls are bound by the
bytes of the weights. Tensor-core tiles need at least 16 rows; this kernel uses the CUDA cores
instead. Codes are ``[N, K]`` (quant_matmul's layout). Each program owns ``block_n`` output
channels and one of ``splits`` parts of K. Per step of its loop it loads a ``[block_n, block_k]``
tile of 1-byte codes (K-contiguous rows), converts them to f32 in registers and adds
``x[m, k] * code[n, k]`` into a ``[block_n, block_k]`` f32 accumulator per token row: no reduction
across threads inside the loop, one reduction over ``block_k`` at the end. The per-channel scale
multiplies the finished column sums (``x @ (code * scale) == (x @ code) * scale``); with several
splits the partial f32 sums are added in XLA first.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxpaged.pallas_kernels.backend import (largest_power_of_2_divisor, splits_that_divide,
                                             triton_call, validate_tiles)

# Token rows one program handles (each row keeps its own accumulator in registers).
GEMV_MAX_ROWS = 8
MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class GemvTuning:
    """``block_k`` x ``block_n`` code tile per loop step (powers of 2; each shrinks to the largest
    power of 2 dividing its K part / N); ``splits`` K parts, each a program (None: enough for
    about ``target_programs`` programs, at most ``max_splits``)."""

    block_k: int = 32
    block_n: int = 256
    splits: int | None = None
    num_warps: int = 8
    num_stages: int = 2
    target_programs: int = 528
    max_splits: int = 16

    def __post_init__(self) -> None:
        validate_tiles(self, ("block_k", "block_n"), MIN_BLOCK)


def gemv_fits(m: int, k: int, n: int) -> bool:
    """Whether ``quant_gemv`` takes this shape: at most ``GEMV_MAX_ROWS`` rows, and K and N with a
    power-of-2 tile of at least ``MIN_BLOCK``."""
    return (1 <= m <= GEMV_MAX_ROWS and largest_power_of_2_divisor(k) >= MIN_BLOCK
            and largest_power_of_2_divisor(n) >= MIN_BLOCK)


def quant_gemv(x: jax.Array, codes: jax.Array, scale: jax.Array, *,
               tuning: GemvTuning | None = None, interpret: bool = False) -> jax.Array:
    """x [M, K] (bf16/f32, M <= ``GEMV_MAX_ROWS``) @ dequantize(codes [N, K], scale f32[N]) ->
    [M, N] in x's dtype, f32 sums."""
    m, k = x.shape
    if codes.ndim != 2 or codes.shape[1] != k or scale.shape != (codes.shape[0],):
        raise ValueError(f"codes must be [N, K={k}] with scale [N], got {codes.shape} and "
                         f"{scale.shape}")
    if not gemv_fits(m, k, codes.shape[0]):
        raise ValueError(f"quant_gemv takes 1..{GEMV_MAX_ROWS} rows and K, N divisible by "
                         f"{MIN_BLOCK}, got M={m}, K={k}, N={codes.shape[0]}")
    return _gemv(x, codes, scale, tuning=tuning or GemvTuning(), interpret=interpret)


def _gemv_kernel(x_ref, w_ref, s_ref, o_ref, *, rows: int, block_k: int, k_steps: int,
                 epilogue: bool):
    """x [rows, Ks], codes [bn, Ks], scale f32[bn] -> out [rows, bn] (``epilogue``: scaled, in
    x's dtype; else this split's raw f32 sums)."""
    block_n = w_ref.shape[0]

    def body(step, accs):
        start = pl.multiple_of(step * block_k, block_k)
        w = w_ref[:, pl.ds(start, block_k)].astype(jnp.float32)  # [bn, bk]
        return tuple(acc + x_ref[row, pl.ds(start, block_k)].astype(jnp.float32)[None, :] * w
                     for row, acc in enumerate(accs))

    zeros = tuple(jnp.zeros((block_n, block_k), jnp.float32) for _ in range(rows))
    accs = lax.fori_loop(0, k_steps, body, zeros)
    for row, acc in enumerate(accs):
        sums = jnp.sum(acc, axis=1)  # [bn]
        if epilogue:
            o_ref[row, :] = (sums * s_ref[...]).astype(o_ref.dtype)
        else:
            o_ref[row, :] = sums


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def _gemv(x, codes, scale, *, tuning: GemvTuning, interpret: bool):
    m, k = x.shape
    n = codes.shape[0]
    rows = pl.next_power_of_2(m)
    block_n = min(tuning.block_n, largest_power_of_2_divisor(n))
    tiles = n // block_n
    wanted = tuning.splits or min(tuning.max_splits,
                                  max(1, pl.cdiv(tuning.target_programs, tiles)))
    splits = splits_that_divide(k, wanted, MIN_BLOCK)
    k_part = k // splits
    block_k = min(tuning.block_k, largest_power_of_2_divisor(k_part))
    x = jnp.pad(x, ((0, rows - m), (0, 0)))
    epilogue = splits == 1
    in_specs = [pl.BlockSpec((rows, k_part), lambda j, s: (0, s)),
                pl.BlockSpec((block_n, k_part), lambda j, s: (j, s)),
                pl.BlockSpec((block_n,), lambda j, s: (j,))]
    if epilogue:
        out_specs = pl.BlockSpec((rows, block_n), lambda j, s: (0, j))
        out_shape = jax.ShapeDtypeStruct((rows, n), x.dtype)
    else:
        out_specs = pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j))
        out_shape = jax.ShapeDtypeStruct((splits, rows, n), jnp.float32)
    kernel = functools.partial(_gemv_kernel, rows=rows, block_k=block_k,
                               k_steps=k_part // block_k, epilogue=epilogue)
    out = triton_call(kernel, name="w8a16_gemv", grid=(tiles, splits), in_specs=in_specs,
                      out_specs=out_specs, out_shape=out_shape, num_warps=tuning.num_warps,
                      num_stages=tuning.num_stages, interpret=interpret)(x, codes, scale)
    if not epilogue:
        out = (out.sum(axis=0) * scale[None, :]).astype(x.dtype)
    return out[:m]

