"""write_kv: the Pallas kernel (interpret mode on CPU, real lowering with -m gpu) and its reference,
both checked on the whole updated pool against a slot-by-slot numpy update; for fp8 pools the
numpy update stores codes quantized independently (``kernel_testing.fp8_codes``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.pallas_kernels.kv_write import write_kv, write_kv_reference
from kernel_testing import E4M3, E5M2, assert_codes_close, assert_pools_equal, fp8_codes


def _make_case(seed: int, *, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
               slots: list[int], dtype=jnp.float32):
    """NaN pool with a few finite pages, new K/V for each slot (-1 = padding)."""
    rng = np.random.default_rng(seed)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_pool = np.full(shape, np.nan, np.float32)
    v_pool = np.full(shape, np.nan, np.float32)
    finite = rng.choice(num_pages, size=num_pages // 2, replace=False)
    k_pool[finite] = rng.standard_normal((len(finite),) + shape[1:])
    v_pool[finite] = rng.standard_normal((len(finite),) + shape[1:])
    new_shape = (len(slots), num_kv_heads, head_dim)
    new_k = rng.standard_normal(new_shape).astype(np.float32)
    new_v = rng.standard_normal(new_shape).astype(np.float32)
    return (jnp.asarray(k_pool, dtype), jnp.asarray(v_pool, dtype), jnp.asarray(new_k, dtype),
            jnp.asarray(new_v, dtype), jnp.asarray(slots, jnp.int32))


def _expected(k_pool, v_pool, new_k, new_v, slots):
    """Slot-by-slot numpy update of copies of the pools."""
    k, v = np.array(k_pool.astype(jnp.float32)), np.array(v_pool.astype(jnp.float32))
    page_size = k.shape[1]
    for t, slot in enumerate(np.asarray(slots)):
        if slot >= 0:
            k[slot // page_size, slot % page_size] = np.asarray(new_k[t].astype(jnp.float32))
            v[slot // page_size, slot % page_size] = np.asarray(new_v[t].astype(jnp.float32))
    return k, v


def _copies(k_pool, v_pool):
    """write_kv donates its pools: hand it copies so the originals stay usable."""
    return jnp.array(k_pool, copy=True), jnp.array(v_pool, copy=True)


# (num_kv_heads, head_dim, page_size, dtype): Hkv = 3 exercises one-head-per-program stores.
CASES = [(2, 64, 16, jnp.float32), (8, 128, 16, jnp.bfloat16), (3, 64, 32, jnp.float32)]
# padding in the middle and at the end, first/last slot of the pool, both sides of a page border
SLOTS = [0, -1, 15, 16, 17, 5 * 16 - 1, 40, -1, -1]


@pytest.mark.parametrize("num_kv_heads,head_dim,page_size,dtype", CASES)
def test_reference_matches_slot_by_slot_update(num_kv_heads, head_dim, page_size, dtype):
    slots = [s * page_size // 16 if s >= 0 else s for s in SLOTS]
    case = _make_case(0, num_pages=5, page_size=page_size, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, slots=slots, dtype=dtype)
    k, v = write_kv_reference(*case)
    k_exp, v_exp = _expected(*case)
    assert_pools_equal(k, k_exp)
    assert_pools_equal(v, v_exp)


@pytest.mark.parametrize("num_kv_heads,head_dim,page_size,dtype", CASES)
def test_kernel_matches_slot_by_slot_update(num_kv_heads, head_dim, page_size, dtype):
    slots = [s * page_size // 16 if s >= 0 else s for s in SLOTS]
    k_pool, v_pool, new_k, new_v, slot_mapping = _make_case(
        1, num_pages=5, page_size=page_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
        slots=slots, dtype=dtype)
    k_exp, v_exp = _expected(k_pool, v_pool, new_k, new_v, slot_mapping)
    k, v = write_kv(*_copies(k_pool, v_pool), new_k, new_v, slot_mapping, impl="pallas",
                    interpret=True)
    assert k.dtype == dtype and v.dtype == dtype
    assert_pools_equal(k, k_exp)
    assert_pools_equal(v, v_exp)


def test_all_padding_and_out_of_range_slots_change_nothing():
    k_pool, v_pool, new_k, new_v, _ = _make_case(2, num_pages=3, page_size=16, num_kv_heads=2,
                                                 head_dim=64, slots=[0, 0, 0])
    slot_mapping = jnp.asarray([-1, 3 * 16, -7], jnp.int32)  # 48 is one past the last slot
    for impl in ("reference", "pallas"):
        k, v = write_kv(*_copies(k_pool, v_pool), new_k, new_v, slot_mapping, impl=impl,
                        interpret=True)
        assert_pools_equal(k, np.asarray(k_pool))
        assert_pools_equal(v, np.asarray(v_pool))


def test_auto_on_cpu_is_the_reference_and_casts_new_values():
    k_pool, v_pool, new_k, new_v, slots = _make_case(3, num_pages=4, page_size=16,
                                                     num_kv_heads=2, head_dim=64,
                                                     slots=[3, 20, -1], dtype=jnp.bfloat16)
    new_k32, new_v32 = new_k.astype(jnp.float32), new_v.astype(jnp.float32)
    k, v = write_kv(*_copies(k_pool, v_pool), new_k32, new_v32, slots)  # impl="auto"
    k_exp, v_exp = _expected(k_pool, v_pool, new_k, new_v, slots)
    assert k.dtype == jnp.bfloat16
    assert_pools_equal(k, k_exp)
    assert_pools_equal(v, v_exp)


def test_kernel_updates_pools_in_place_under_jit():
    """The pools are donated and aliased into the kernel: the step's jit reuses their buffers."""
    shape = jax.ShapeDtypeStruct((64, 16, 8, 128), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((8, 8, 128), jnp.bfloat16)
    lowered = write_kv.trace(shape, shape, new, new, jax.ShapeDtypeStruct((8,), jnp.int32),
                             impl="pallas", interpret=True).lower()
    text = lowered.as_text()
    assert text.count("tf.aliasing_output") == 2, "both pools must alias an output"


@pytest.mark.parametrize("bad,match", [
    (dict(slot_mapping=jnp.zeros((3,), jnp.float32)), "slot_mapping"),
    (dict(slot_mapping=jnp.zeros((2,), jnp.int32)), "new_k"),
    (dict(new_v=jnp.zeros((3, 2, 32), jnp.float32)), "new_v"),
    (dict(v_cache=jnp.zeros((4, 16, 2, 32), jnp.float32)), "v_cache"),
    (dict(impl="triton"), "impl"),
])
def test_bad_input_raises_value_error(bad, match):
    args = dict(k_cache=jnp.zeros((4, 16, 2, 64), jnp.float32),
                v_cache=jnp.zeros((4, 16, 2, 64), jnp.float32),
                new_k=jnp.zeros((3, 2, 64), jnp.float32), new_v=jnp.zeros((3, 2, 64), jnp.float32),
                slot_mapping=jnp.zeros((3,), jnp.int32))
    impl = bad.pop("impl", "reference")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        write_kv(**args, impl=impl)


def test_non_power_of_2_head_dim_is_rejected_by_the_kernel_only():
    args = _make_case(4, num_pages=3, page_size=16, num_kv_heads=2, head_dim=48, slots=[1, -1])
    with pytest.raises(ValueError, match="head_dim"):
        write_kv(*_copies(*args[:2]), *args[2:], impl="pallas", interpret=True)
    k, _ = write_kv(*_copies(*args[:2]), *args[2:], impl="reference")
    assert_pools_equal(k, _expected(*args)[0])


# ------------------------------------------------------------------------------------- fp8 pools

FP8_SCALES = dict(k_scale=1.0 / 128, v_scale=0.5)  # K: e4m3 clips past 3.5, which 3 N(0, 1) passes


def _fp8_case(seed: int, *, pool_dtype, new_dtype, num_pages: int, page_size: int,
              num_kv_heads: int, head_dim: int, slots: list[int]):
    """``_make_case`` with its pools quantized (NaN pages stay NaN) and K three times larger."""
    k_pool, v_pool, new_k, new_v, slots = _make_case(
        seed, num_pages=num_pages, page_size=page_size, num_kv_heads=num_kv_heads,
        head_dim=head_dim, slots=slots, dtype=new_dtype)
    pools = [jnp.asarray(fp8_codes(p, 1.0, pool_dtype)) for p in (k_pool, v_pool)]
    return (*pools, (3 * new_k.astype(jnp.float32)).astype(new_dtype), new_v, slots)


def _expected_fp8(k_pool, v_pool, new_k, new_v, slots):
    """The slot-by-slot update of ``_expected`` with the new values quantized in numpy."""
    dtype = k_pool.dtype
    codes = [fp8_codes(np.asarray(new.astype(jnp.float32)), FP8_SCALES[name], dtype)
             for name, new in (("k_scale", new_k), ("v_scale", new_v))]
    return _expected(k_pool, v_pool, *(jnp.asarray(c) for c in codes), slots)


# (num_kv_heads, head_dim, page_size, pool dtype, new K/V dtype)
FP8_CASES = [(2, 64, 16, E4M3, jnp.bfloat16), (3, 64, 32, E5M2, jnp.float32),
             (8, 128, 16, E4M3, jnp.float32)]


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("num_kv_heads,head_dim,page_size,pool_dtype,new_dtype", FP8_CASES,
                         ids=[f"Hkv{c[0]}-D{c[1]}-bs{c[2]}-{c[3].name}" for c in FP8_CASES])
def test_fp8_pool_stores_quantized_codes(num_kv_heads, head_dim, page_size, pool_dtype,
                                         new_dtype, impl):
    slots = [s * page_size // 16 if s >= 0 else s for s in SLOTS]
    case = _fp8_case(6, pool_dtype=pool_dtype, new_dtype=new_dtype, num_pages=5,
                     page_size=page_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     slots=slots)
    k_exp, v_exp = _expected_fp8(*case)
    k, v = write_kv(*_copies(*case[:2]), *case[2:], **FP8_SCALES, impl=impl, interpret=True)
    assert k.dtype == pool_dtype and v.dtype == pool_dtype
    assert_pools_equal(k, k_exp)
    assert_pools_equal(v, v_exp)
    if pool_dtype == E4M3:  # the clip is exercised: some K codes sit at the largest value
        assert np.sum(np.abs(np.asarray(k.astype(jnp.float32))) == 448.0) > 0


def test_fp8_scales_only_for_fp8_pools_and_one_by_default():
    case = _make_case(7, num_pages=3, page_size=16, num_kv_heads=2, head_dim=64, slots=[1, 20])
    with pytest.raises(ValueError, match="fp8 pools only"):
        write_kv(*_copies(*case[:2]), *case[2:], k_scale=0.5, impl="reference")
    k_pool, v_pool = (jnp.asarray(fp8_codes(p, 1.0, E4M3)) for p in case[:2])
    k, _ = write_kv(*_copies(k_pool, v_pool), *case[2:], impl="pallas", interpret=True)
    k_exp, _ = _expected(k_pool, v_pool, jnp.asarray(fp8_codes(case[2], 1.0, E4M3)),
                         case[3], case[4])
    assert_pools_equal(k, k_exp)


def test_fp8_scale_is_an_operand_under_jit():
    pool = jax.ShapeDtypeStruct((64, 16, 8, 128), E4M3)
    new = jax.ShapeDtypeStruct((8, 8, 128), jnp.bfloat16)
    scale = jax.ShapeDtypeStruct((), jnp.float32)
    text = write_kv.trace(pool, pool, new, new, jax.ShapeDtypeStruct((8,), jnp.int32),
                          k_scale=scale, v_scale=scale, impl="pallas",
                          interpret=True).lower().as_text()
    assert text.count("tf.aliasing_output") == 2, "both pools must alias an output"


# ------------------------------------------------------------------------------------------- GPU

def _gpu_slots(num_pages: int, page_size: int) -> list[int]:
    rng = np.random.default_rng(5)
    slots = rng.choice(num_pages * page_size, size=200, replace=False).astype(np.int64)
    slots[rng.choice(200, size=30, replace=False)] = -1
    return slots.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("pool_dtype", [E4M3, E5M2], ids=lambda d: d.name)
def test_fp8_kernel_on_gpu(pool_dtype):
    """Codes as numpy quantizes them; a few may be one step apart (the GPU's f32 division need
    not round exactly as IEEE does)."""
    case = _fp8_case(5, pool_dtype=pool_dtype, new_dtype=jnp.bfloat16, num_pages=300,
                     page_size=16, num_kv_heads=8, head_dim=128, slots=_gpu_slots(300, 16))
    k_exp, v_exp = _expected_fp8(*case)
    k, v = write_kv(*_copies(*case[:2]), *case[2:], **FP8_SCALES, impl="pallas")
    assert_codes_close(k, k_exp, pool_dtype, "k", max_fraction_off=1e-3)
    assert_codes_close(v, v_exp, pool_dtype, "v", max_fraction_off=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_on_gpu(dtype):
    case = _make_case(5, num_pages=300, page_size=16, num_kv_heads=8, head_dim=128,
                      slots=_gpu_slots(300, 16), dtype=dtype)
    k_exp, v_exp = _expected(*case)
    k, v = write_kv(*_copies(*case[:2]), *case[2:], impl="pallas")
    assert_pools_equal(k, k_exp)
    assert_pools_equal(v, v_exp)
