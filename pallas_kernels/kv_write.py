"""Write the step's new K/V into their pool slots, in place.

Pool layout (per K and per V): ``[P, block_size, Hkv, D]``; slot ``s`` is token ``s % block_size``
of page ``s // block_size``. ``slot_mapping[t] == -1`` marks a padding token that is skipped (as is
any slot outside ``[0, P * block_size)``); every other slot of the pool is left exactly as it was,
NaN included.

fp8 pools (``kv_quant``): each stored value is quantized on store, ``fp8(clip(x / scale, -max,
max))`` with the layer's per-tensor ``k_scale`` / ``v_scale``, which reach the kernel as one
``f32[2]`` operand (not a static argument: all layers share one compiled kernel). Other pools take
no scales and store ``x`` cast to the pool dtype.

Kernel: grid ``(T, Hkv // heads_per_program)``; each program reads its token's slot and, when the
slot is real, stores its ``[heads_per_program, D]`` rows of K and V straight into the pool. The
pools are passed with ``input_output_aliases`` and the public function donates them, so XLA
updates the buffers in place (no pool copy). ``heads_per_program`` is the largest power of 2
dividing Hkv (Triton stores need power-of-2 sizes): Hkv = 8 writes a token's 8 x 128 values in
one program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpaged.pallas_kernels.backend import (largest_power_of_2_divisor, require_power_of_2,
                                             resolve_impl, triton_call)
from jaxpaged.pallas_kernels.kv_quant import (kv_scales, load_scales, reference_scales, scales_spec,
                                              to_pool)


def _write_kv_kernel(slot_ref,  # i32[1]: this token's slot, -1 = padding
                     new_k_ref,  # [hb, D]: this token's K rows for heads head0 .. head0 + hb
                     new_v_ref,  # [hb, D]
                     k_in_ref,  # aliased with k_out_ref; not read
                     v_in_ref,  # aliased with v_out_ref; not read
                     *refs,  # [f32[2] (k_scale, v_scale): fp8 pools only], k_out, v_out
                     page_size: int, num_slots: int):
    del k_in_ref, v_in_ref
    *scale_refs, k_out_ref, v_out_ref = refs  # pools [P, bs, Hkv, D], whole
    k_scale, v_scale = load_scales(scale_refs)
    slot = slot_ref[0]
    heads_per_program = new_k_ref.shape[0]
    head0 = pl.program_id(1) * heads_per_program

    @pl.when((slot >= 0) & (slot < num_slots))
    def _store():
        page = slot // page_size
        offset = slot % page_size
        heads = pl.ds(head0, heads_per_program)
        k_out_ref[page, offset, heads, :] = to_pool(new_k_ref[...], k_scale, k_out_ref.dtype)
        v_out_ref[page, offset, heads, :] = to_pool(new_v_ref[...], v_scale, v_out_ref.dtype)


def _write_kv_pallas(k_cache, v_cache, new_k, new_v, slot_mapping, scales, *, interpret: bool):
    num_pages, page_size, num_kv_heads, head_dim = k_cache.shape
    num_tokens = new_k.shape[0]
    heads_per_program = largest_power_of_2_divisor(num_kv_heads)
    grid = (num_tokens, num_kv_heads // heads_per_program)
    kernel = functools.partial(_write_kv_kernel, page_size=page_size,
                               num_slots=min(num_pages * page_size, 2**31 - 1))
    token_spec = pl.BlockSpec((None, heads_per_program, head_dim), lambda t, h: (t, h, 0))
    pool_spec = pl.BlockSpec(k_cache.shape, lambda t, h: (0, 0, 0, 0))
    quantized = () if scales is None else (scales,)
    return triton_call(
        kernel,
        name="write_kv" if scales is None else f"write_kv_{k_cache.dtype.name}",
        grid=grid,
        in_specs=[pl.BlockSpec((1,), lambda t, h: (t,)), token_spec, token_spec,
                  pool_spec, pool_spec] + [scales_spec()] * len(quantized),
        out_specs=[pool_spec, pool_spec],
        out_shape=[jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={3: 0, 4: 1},
        num_warps=1,
        num_stages=1,
        interpret=interpret,
    )(slot_mapping, new_k, new_v, k_cache, v_cache, *quantized)


def _validate(k_cache, v_cache, new_k, new_v, slot_mapping) -> None:
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [P, block_size, Hkv, D], got shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {v_cache.shape} {v_cache.dtype} must match k_cache "
                         f"{k_cache.shape} {k_cache.dtype}")
    token_shape = (slot_mapping.shape[0],) + tuple(k_cache.shape[2:])
    for name, new in (("new_k", new_k), ("new_v", new_v)):
        if new.shape != token_shape:
            raise ValueError(f"{name} must be [T, Hkv, D] = {list(token_shape)}, got "
                             f"{list(new.shape)}")
    if slot_mapping.ndim != 1 or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be i32[T], got {slot_mapping.dtype}"
                         f"{list(slot_mapping.shape)}")


@functools.partial(jax.jit, static_argnames=("impl", "interpret"),
                   donate_argnames=("k_cache", "v_cache"))
def write_kv(k_cache: jax.Array,  # [P, bs, Hkv, D] (donated)
             v_cache: jax.Array,  # [P, bs, Hkv, D] (donated)
             new_k: jax.Array,  # [T, Hkv, D], cast to (fp8: quantized into) the cache dtype
             new_v: jax.Array,  # [T, Hkv, D]
             slot_mapping: jax.Array,  # i32[T]: page * bs + offset, -1 = padding
             *, k_scale: jax.Array | float | None = None,  # f32 scalar: fp8 pools only
             v_scale: jax.Array | float | None = None,
             impl: str = "auto", interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Return the pools with ``new_k[t]``/``new_v[t]`` stored at slot ``slot_mapping[t]``.

    An fp8 pool stores ``fp8(clip(new_k / k_scale, -max, max))`` (a missing scale is 1.0); other
    pools take no scales. The pools are donated: do not use the arrays passed in afterwards.
    ``impl``: "auto" (Pallas on a CUDA GPU, else the jnp reference), "pallas" (with
    ``interpret=True`` it runs on the CPU) or "reference". Duplicate real slots in one call are
    not supported (either write may win).
    """
    _validate(k_cache, v_cache, new_k, new_v, slot_mapping)
    scales = kv_scales(k_cache.dtype, k_scale, v_scale)
    if scales is None:
        new_k = new_k.astype(k_cache.dtype)
        new_v = new_v.astype(v_cache.dtype)
    if resolve_impl(impl) == "reference" or slot_mapping.shape[0] == 0:
        return write_kv_reference(k_cache, v_cache, new_k, new_v, slot_mapping, k_scale=k_scale,
                                  v_scale=v_scale)
    require_power_of_2("head_dim", k_cache.shape[3])
    return _write_kv_pallas(k_cache, v_cache, new_k, new_v, slot_mapping, scales,
                            interpret=interpret)


def write_kv_reference(k_cache: jax.Array, v_cache: jax.Array, new_k: jax.Array,
                       new_v: jax.Array, slot_mapping: jax.Array, *,
                       k_scale: jax.Array | float | None = None,
                       v_scale: jax.Array | float | None = None, impl: str = "auto",
                       interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """jnp scatter: padding (and any out-of-range slot) is mapped past the pool and dropped."""
    del impl, interpret
    _validate(k_cache, v_cache, new_k, new_v, slot_mapping)
    k_scale, v_scale = reference_scales(k_cache.dtype, k_scale, v_scale)
    num_pages, page_size = k_cache.shape[:2]
    real = (slot_mapping >= 0) & (slot_mapping < num_pages * page_size)
    page = jnp.where(real, slot_mapping // page_size, num_pages)  # num_pages: dropped
    offset = jnp.where(real, slot_mapping % page_size, 0)
    k_cache = k_cache.at[page, offset].set(to_pool(new_k, k_scale, k_cache.dtype), mode="drop")
    v_cache = v_cache.at[page, offset].set(to_pool(new_v, v_scale, v_cache.dtype), mode="drop")
    return k_cache, v_cache
