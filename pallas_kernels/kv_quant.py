"""fp8 KV pools: the formats, the per-tensor scales, the one quantize arithmetic of every kernel.

A pool whose dtype is an fp8 format (``float8_e4m3fn``, vLLM's "fp8" / "fp8_e4m3", or
``float8_e5m2``) stores, for a K value ``x`` of a layer, the code

    code = fp8(clip(x / k_scale, -fp8_max, fp8_max))      (round to nearest even)

and ``code * k_scale`` is the value it stands for (V likewise with ``v_scale``). The scales are
per layer and per tensor (one f32 for all of a layer's K, one for its V). They reach the kernels
as an operand, ``f32[2] = (k_scale, v_scale)``, never as a static argument: every layer runs the
same compiled kernel, as with the layer's slot offset. Pools of any other dtype (bf16, f16, f32)
take no scales and keep the kernels exactly as they were.

Reading side (attention kernels and their references). fp8 -> the query dtype (bf16/f16/f32) is
exact (every e4m3 and e5m2 value is a bf16, f16 and f32 value), so a loaded tile is converted in
registers and the matmuls run as before; the scales are folded where they cost one multiply per
row or per score instead of one per loaded element:

    logits = (q . (k_code * k_scale)) * sm_scale = (q . k_code) * (sm_scale * k_scale)
    out    = sum_j p_j (v_code_j * v_scale) / l  = (sum_j p_j v_code_j) * (v_scale / l)

Accuracy (``attention_error_bound``). A value that is not clipped and lands in the format's
normal range is stored within half a step of the format (relative eps / 2: 2^-4 for e4m3, 2^-3
for e5m2). The attention output is a softmax-weighted average of V rows whose logits carry errors
of that order too; the errors are independent, so they average rather than add up, and the
output's relative-norm error against exact attention over the unquantized K/V stays at the
per-value level: about eps / 4 on random data, and eps / 2 is the stated bound that
tests/test_kernel_attention.py and ``bench/kernels.py --check`` hold the kernels to. It assumes
scales that map the data into the normal range (amax / scale near fp8_max, as vLLM's
calculate_kv_scales does); a scale far too large sends values into subnormals and loses more, one
too small clips.

Facts of the Pallas Triton lowering in jax 0.11.2, verified by lowering for an abstract H100 on
the CPU (tests/test_kernel_lowering.py; compiling the Triton IR to PTX happens only on a GPU):
fp8 refs need no uint8 + ``bitcast_convert_type`` workaround. Loads of ``float8_e4m3fn`` and
``float8_e5m2`` refs (plain, gathered through an index vector, and masked) lower to ``tt.load``
of ``f8E4M3FN`` / ``f8E5M2`` tensors, fp8 -> bf16/f32 to ``tt.fp_to_fp``, f32 -> fp8 to
``tt.fp_to_fp`` with ``rounding = rtne``, and stores of fp8 values to ``tt.store``. One trap: a
masked load's ``other=0`` (an int) fails to lower for an fp8 ref (no int -> fp8 cast), so it
takes an fp8 zero (``masked_load_fill``). The lowering refuses casts from/to ``float8_e4m3fn``
below compute capability 8.9 (Ada, Hopper and newer only) and any ``float8_e4m3fnuz`` cast
(``_UNSUPPORTED_CAST_DTYPES`` in ``jax/_src/pallas/triton/lowering.py``); bf16 -> fp8 is
lowered via f32 (exact, then one rounding). Interpret mode runs all of it on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
# Query dtypes an fp8 pool can be read with: fp8 converts to each of them exactly.
COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def is_fp8(dtype: jnp.dtype) -> bool:
    return jnp.dtype(dtype) in FP8_DTYPES


def compute_dtype(cache_dtype: jnp.dtype, q_dtype: jnp.dtype) -> jnp.dtype:
    """The dtype a kernel converts loaded K/V tiles (and q) to before its matmuls.

    A bf16 query over an fp8 pool computes in float16: fp8 -> f16 is one conversion instruction
    per two values on Hopper (e5m2 is f16's top byte), fp8 -> bf16 a chain of them, which made
    the fp8 decode kernel no faster than bf16 on half the bytes (bench/RESULTS.md). Every fp8 code
    is exact in f16; q rounds to f16's 10-bit mantissa (finer than bf16's 7) after a clip to its
    range. Other pools and queries keep q's dtype."""
    if is_fp8(cache_dtype) and jnp.dtype(q_dtype) == jnp.dtype(jnp.bfloat16):
        return jnp.dtype(jnp.float16)
    return jnp.dtype(q_dtype)


def to_compute(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` in the compute dtype; a narrowing to f16 clips to its finite range first."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.float16) and x.dtype != jnp.float16:
        limit = float(jnp.finfo(jnp.float16).max)
        x = jnp.clip(x.astype(jnp.float32), -limit, limit)
    return x.astype(dtype)


def fp8_max(dtype: jnp.dtype) -> float:
    """Largest finite value of the fp8 format (448 for e4m3fn, 57344 for e5m2)."""
    return float(jnp.finfo(dtype).max)


def attention_error_bound(dtype: jnp.dtype) -> float:
    """Stated bound on the relative-norm error of attention over an fp8 pool against exact
    attention over the unquantized K/V: eps / 2 of the format (module doc, Accuracy)."""
    return float(jnp.finfo(dtype).eps) / 2


def quantize(x: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``fp8(clip(x / scale, -max, max))``: the stored code of ``x`` (f32 math, one rounding).

    x: any float array; scale: f32 scalar (a loaded value in a kernel). NaN stays NaN.
    """
    limit = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) / scale, -limit, limit).astype(dtype)


def _check_scale(name: str, scale) -> None:
    shape = jnp.shape(scale)
    if shape not in ((), (1,)):
        raise ValueError(f"{name} must be a scalar (one f32 per layer and tensor), got shape "
                         f"{shape}")
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) or jnp.issubdtype(
            jnp.result_type(scale), jnp.floating)):
        raise ValueError(f"{name} must be a real number, got {scale!r}")


def kv_scales(cache_dtype: jnp.dtype, k_scale, v_scale) -> jax.Array | None:
    """The kernels' scale operand ``f32[2] = (k_scale, v_scale)`` for an fp8 pool (a missing
    scale is 1.0); None for any other pool, which must not be given scales (ValueError)."""
    if not is_fp8(cache_dtype):
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale apply to fp8 pools only; the pool dtype is "
                             f"{jnp.dtype(cache_dtype)}")
        return None
    scales = []
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            scale = 1.0
        _check_scale(name, scale)
        scales.append(jnp.asarray(scale, jnp.float32).reshape(()))
    return jnp.stack(scales)  # f32[2]


def reference_scales(cache_dtype: jnp.dtype, k_scale, v_scale) -> tuple:
    """(k_scale, v_scale) as the jnp references multiply by them: f32 scalars for an fp8 pool,
    1.0 (a no-op) for any other."""
    scales = kv_scales(cache_dtype, k_scale, v_scale)
    return (1.0, 1.0) if scales is None else (scales[0], scales[1])


def scales_spec() -> pl.BlockSpec:
    """BlockSpec of the ``f32[2]`` scale operand: every program sees both scales."""
    return pl.BlockSpec((2,), lambda *_: (0,))


def load_scales(scale_refs) -> tuple[jax.Array | None, jax.Array | None]:
    """(k_scale, v_scale) f32 scalars inside a kernel; ``scale_refs`` is the empty tuple (no
    scale operand: a non-fp8 pool, both None) or the one ``f32[2]`` scale ref."""
    if not scale_refs:
        return None, None
    (scales_ref,) = scale_refs
    return scales_ref[0], scales_ref[1]


def to_pool(x: jax.Array, scale, dtype: jnp.dtype) -> jax.Array:
    """What a pool of ``dtype`` stores for ``x``: its fp8 code under ``scale`` (an f32 scalar)
    for an fp8 pool, else ``x`` cast (``scale`` unused)."""
    return quantize(x, scale, dtype) if is_fp8(dtype) else x.astype(dtype)


def masked_load_fill(dtype: jnp.dtype):
    """``other`` of a masked ``plt.load`` from a pool: zero. The Triton lowering casts ``other``
    to the ref's dtype and has no int -> fp8 cast ("cannot cast ... tp tensor<...xf8E4M3FN>"),
    so an fp8 ref gets a zero of its own dtype; other pools keep the plain ``0``."""
    return jnp.zeros((), dtype) if is_fp8(dtype) else 0


def validate_query_dtype(q_dtype: jnp.dtype, cache_dtype: jnp.dtype) -> None:
    """Queries share the pool dtype, or read an fp8 pool as bf16/f16/f32."""
    q_dtype, cache_dtype = jnp.dtype(q_dtype), jnp.dtype(cache_dtype)
    if is_fp8(cache_dtype):
        if q_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"q dtype {q_dtype} cannot read an fp8 pool ({cache_dtype}); use "
                             f"one of {[d.name for d in COMPUTE_DTYPES]}")
    elif q_dtype != cache_dtype:
        raise ValueError(f"q dtype {q_dtype} must equal the cache dtype {cache_dtype}")
