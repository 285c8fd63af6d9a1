"""Rotary embedding of the step's q and k, and the K/V write into the pool, in one kernel.

Input is the fused QKV projection as the model computes it, ``qkv [T, Hkv, G + 2, D]`` (per kv
head: its G query heads, then K, then V), with ``cos``/``sin`` f32[T, D] in Hugging Face's
split-half layout (``rotate_half``). Output: q with RoPE applied, ``[T, Hq, D]`` (query head
``kv_head * G + g``), and the pools with each real token's roped K and its V stored at slot
``slot_mapping[t] + slot_offset`` (``slot_mapping[t] == -1`` marks padding: nothing is stored; nor is
anything stored for a slot outside the pool). Pool layout as in ``kv_write``: ``[P, block_size,
Hkv, D]``, updated in place (donated, ``input_output_aliases``).

Why one kernel. Done in XLA, a decode layer spends five small kernels here (slice V, rope K, rope q,
the layer's slot offset, the K/V write), each paying a launch at batch 1; this is one, measured
faster and with fewer kernels per step (bench/RESULTS.md, "third run").
``slot_offset`` (an i32 scalar operand, not a static argument) moves layer-local slots into the
layer-flattened pool, so every layer runs the same compiled kernel.

Kernel: grid ``(T, Hkv // hb)``; a program reads its token's ``hb`` kv heads (``hb`` = the largest
power of 2 dividing Hkv, so Hkv = 8 is one program per token once T >= 128; fewer tokens get fewer
heads per program, down to one, so that a decode step of a few tokens still spreads its latency-bound
loads over many SMs), rotates the two halves of q and k separately (Triton cannot slice a loaded
value, so each half is its own load and store), and stores. Arithmetic: cos/sin rounded to the
activation dtype as in the reference (and HF), products and sum in f32, one rounding at the end
(the bf16 reference rounds after each op; f32 inputs agree to ~1e-6). Needs G and D/2 to be powers
of 2 (Triton array sizes); other shapes take the reference.

fp8 pools (``kv_quant``): the roped K (still f32 in registers) and V are quantized on store,
``fp8(clip(x / scale, -max, max))``, with the layer's ``k_scale`` / ``v_scale`` passed as one
``f32[2]`` operand, like ``slot_offset`` an operand so that all layers share the kernel. The
reference ropes K in the activation dtype first (as for bf16 pools), so the two may round a
stored K code differently by one fp8 step; V codes agree exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpaged.pallas_kernels.backend import (is_power_of_2, largest_power_of_2_divisor,
                                             resolve_impl, triton_call)
from jaxpaged.pallas_kernels.kv_quant import kv_scales, load_scales, scales_spec, to_pool
from jaxpaged.pallas_kernels.kv_write import write_kv_reference

# Programs below which a program takes fewer kv heads (about one per SM of an H100).
_MIN_PROGRAMS = 128


def _rope_halves(x1: jax.Array, x2: jax.Array, c1: jax.Array, c2: jax.Array, s1: jax.Array,
                 s2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x * cos + rotate_half(x) * sin`` on the two halves of the last axis, in f32."""
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


def _rope_kv_kernel(slot_ref,  # i32[T]
                    offset_ref,  # i32[1]: added to every real slot
                    qkv_ref,  # [T, Hkv, G + 2, D]
                    cos_ref,  # f32[T, D]
                    sin_ref,  # f32[T, D]
                    k_in_ref,  # aliased with k_out_ref; not read
                    v_in_ref,  # aliased with v_out_ref; not read
                    *refs,  # [f32[2] (k_scale, v_scale): fp8 pools only], q_out, k_out, v_out
                    heads_per_program: int, group: int, num_slots: int):
    del k_in_ref, v_in_ref
    *scale_refs, q_out_ref, k_out_ref, v_out_ref = refs  # [T, Hkv, G, D], pools [P, bs, Hkv, D]
    k_scale, v_scale = load_scales(scale_refs)
    token = pl.program_id(0)
    heads = pl.ds(pl.program_id(1) * heads_per_program, heads_per_program)
    half = qkv_ref.shape[-1] // 2
    first, second = pl.ds(0, half), pl.ds(half, half)
    dtype = q_out_ref.dtype

    def trig(ref, part):  # [half] rounded like the reference, then f32
        return ref[token, part].astype(dtype).astype(jnp.float32)

    c1, c2, s1, s2 = trig(cos_ref, first), trig(cos_ref, second), trig(sin_ref, first), \
        trig(sin_ref, second)

    queries = pl.ds(0, group)
    q1, q2 = _rope_halves(qkv_ref[token, heads, queries, first],  # [hb, G, half]
                          qkv_ref[token, heads, queries, second], c1, c2, s1, s2)
    q_out_ref[token, heads, :, first] = q1.astype(dtype)
    q_out_ref[token, heads, :, second] = q2.astype(dtype)

    slot = slot_ref[token]
    real = slot >= 0
    slot = slot + offset_ref[0]

    @pl.when(real & (slot >= 0) & (slot < num_slots))
    def _store():
        page_size = k_out_ref.shape[1]
        page, offset = slot // page_size, slot % page_size
        k1, k2 = _rope_halves(qkv_ref[token, heads, group, first],  # [hb, half]
                              qkv_ref[token, heads, group, second], c1, c2, s1, s2)
        k_out_ref[page, offset, heads, first] = to_pool(k1, k_scale, k_out_ref.dtype)
        k_out_ref[page, offset, heads, second] = to_pool(k2, k_scale, k_out_ref.dtype)
        v_out_ref[page, offset, heads, :] = to_pool(qkv_ref[token, heads, group + 1, :],
                                                    v_scale, v_out_ref.dtype)


def _heads_per_program(num_tokens: int, num_kv_heads: int) -> int:
    """The largest power of 2 dividing Hkv (Triton stores need power-of-2 sizes), lowered while
    the grid would have fewer programs than ``_MIN_PROGRAMS``: a few tokens spread over more SMs.
    """
    heads = largest_power_of_2_divisor(num_kv_heads)
    while heads > 1 and num_tokens * num_kv_heads // heads < _MIN_PROGRAMS:
        heads //= 2
    return heads


def _rope_kv_pallas(qkv, cos, sin, k_cache, v_cache, slot_mapping, slot_offset, scales, *,
                    interpret: bool):
    num_tokens, num_kv_heads, width, head_dim = qkv.shape
    group = width - 2
    heads_per_program = _heads_per_program(num_tokens, num_kv_heads)
    kernel = functools.partial(_rope_kv_kernel, heads_per_program=heads_per_program, group=group,
                               num_slots=min(k_cache.shape[0] * k_cache.shape[1], 2**31 - 1))

    def whole(shape):  # the kernel indexes whole arrays itself
        return pl.BlockSpec(shape, lambda t, h: (0,) * len(shape))

    q_shape = (num_tokens, num_kv_heads, group, head_dim)
    quantized = () if scales is None else (scales,)
    q, k_cache, v_cache = triton_call(
        kernel,
        name="rope_write_kv" if scales is None else f"rope_write_kv_{k_cache.dtype.name}",
        grid=(num_tokens, num_kv_heads // heads_per_program),
        in_specs=[whole(slot_mapping.shape), whole((1,)), whole(qkv.shape), whole(cos.shape),
                  whole(sin.shape), whole(k_cache.shape), whole(v_cache.shape)]
        + [scales_spec()] * len(quantized),
        out_specs=[whole(q_shape), whole(k_cache.shape), whole(v_cache.shape)],
        out_shape=[jax.ShapeDtypeStruct(q_shape, qkv.dtype),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={5: 1, 6: 2},
        num_warps=2,
        num_stages=1,
        interpret=interpret,
    )(slot_mapping, slot_offset, qkv, cos, sin, k_cache, v_cache, *quantized)
    return q.reshape(num_tokens, num_kv_heads * group, head_dim), k_cache, v_cache


def _validate(qkv, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    if qkv.ndim != 4 or qkv.shape[2] < 3:
        raise ValueError(f"qkv must be [T, Hkv, G + 2, D] with G >= 1, got shape {qkv.shape}")
    num_tokens, num_kv_heads, _, head_dim = qkv.shape
    if k_cache.ndim != 4 or k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"k_cache must be [P, block_size, {num_kv_heads}, {head_dim}], got "
                         f"shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {v_cache.shape} {v_cache.dtype} must match k_cache "
                         f"{k_cache.shape} {k_cache.dtype}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (num_tokens, head_dim):
            raise ValueError(f"{name} must be [T, D] = [{num_tokens}, {head_dim}], got "
                             f"{list(table.shape)}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be i32[{num_tokens}], got {slot_mapping.dtype}"
                         f"{list(slot_mapping.shape)}")


def _fits_kernel(qkv: jax.Array) -> bool:
    """Triton array sizes: G, D/2 (the loaded halves) and the heads of a program, powers of 2."""
    return is_power_of_2(qkv.shape[2] - 2) and is_power_of_2(qkv.shape[3] // 2)


@functools.partial(jax.jit, static_argnames=("impl", "interpret"),
                   donate_argnames=("k_cache", "v_cache"))
def rope_and_write_kv(qkv: jax.Array,  # [T, Hkv, G + 2, D]: per kv head G queries, K, V
                      cos: jax.Array,  # f32[T, D]
                      sin: jax.Array,  # f32[T, D]
                      k_cache: jax.Array,  # [P, bs, Hkv, D] (donated)
                      v_cache: jax.Array,  # [P, bs, Hkv, D] (donated)
                      slot_mapping: jax.Array,  # i32[T]: -1 = padding
                      slot_offset: jax.Array | int = 0,  # i32 scalar added to real slots
                      *, k_scale: jax.Array | float | None = None,  # f32 scalar: fp8 pools only
                      v_scale: jax.Array | float | None = None,
                      impl: str = "auto",
                      interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Return (q with RoPE [T, Hq, D], k_cache, v_cache with roped K and V stored).

    Token ``t`` (``slot_mapping[t] >= 0``) is stored at slot ``slot_mapping[t] + slot_offset``
    (page ``slot // bs``, row ``slot % bs``); slots outside the pool are dropped. An fp8 pool
    stores ``fp8(clip(k / k_scale, -max, max))`` (V with ``v_scale``; a missing scale is 1.0);
    other pools take no scales. The pools are donated. Duplicate real slots in one call are not
    supported. ``impl``: "auto" (Pallas on a CUDA GPU, else the jnp reference), "pallas"
    (``interpret=True`` runs it on the CPU) or "reference".
    """
    _validate(qkv, cos, sin, k_cache, v_cache, slot_mapping)
    scales = kv_scales(k_cache.dtype, k_scale, v_scale)
    offset = jnp.asarray(slot_offset, jnp.int32).reshape(1)
    if (resolve_impl(impl) == "reference" or qkv.shape[0] == 0 or not _fits_kernel(qkv)):
        return rope_and_write_kv_reference(qkv, cos, sin, k_cache, v_cache, slot_mapping, offset,
                                           k_scale=k_scale, v_scale=v_scale)
    return _rope_kv_pallas(qkv, cos, sin, k_cache, v_cache, slot_mapping, offset, scales,
                           interpret=interpret)


def apply_rope(x: jax.Array,  # [T, heads, D]
               cos: jax.Array,  # f32[T, D]
               sin: jax.Array) -> jax.Array:  # f32[T, D]
    """Hugging Face's ``x * cos + rotate_half(x) * sin``, with cos/sin in x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :].astype(x.dtype) + rotated * sin[:, None, :].astype(x.dtype)


def rope_and_write_kv_reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                                k_cache: jax.Array, v_cache: jax.Array, slot_mapping: jax.Array,
                                slot_offset: jax.Array | int = 0, *,
                                k_scale: jax.Array | float | None = None,
                                v_scale: jax.Array | float | None = None, impl: str = "auto",
                                interpret: bool = False
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """jnp: split qkv, ``apply_rope`` to q and k, scatter K/V (``write_kv_reference``: a cast,
    or for an fp8 pool the quantization)."""
    del impl, interpret
    _validate(qkv, cos, sin, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, width, head_dim = qkv.shape
    group = width - 2
    q = apply_rope(qkv[:, :, :group].reshape(num_tokens, num_kv_heads * group, head_dim), cos, sin)
    k = apply_rope(qkv[:, :, group], cos, sin)
    offset = jnp.asarray(slot_offset, jnp.int32).reshape(())
    slots = jnp.where(slot_mapping >= 0, slot_mapping + offset, -1)
    k_cache, v_cache = write_kv_reference(k_cache, v_cache, k, qkv[:, :, group + 1], slots,
                                          k_scale=k_scale, v_scale=v_scale)
    return q, k_cache, v_cache
