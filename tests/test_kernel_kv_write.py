"""write_kv: the Pallas kernel (interpret mode on CPU, real lowering with -m gpu) and its reference,
both checked on the whole updated pool against a slot-by-slot numpy update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.pallas_kernels.kv_write import write_kv, write_kv_reference
from kernel_testing import assert_pools_equal


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_on_gpu(dtype):
    rng = np.random.default_rng(5)
    num_pages, page_size = 300, 16
    slots = rng.choice(num_pages * page_size, size=200, replace=False).astype(np.int64)
    slots[rng.choice(200, size=30, replace=False)] = -1
    case = _make_case(5, num_pages=num_pages, page_size=page_size, num_kv_heads=8, head_dim=128,
                      slots=slots.tolist(), dtype=dtype)
    k_exp, v_exp = _expected(*case)
    k, v = write_kv(*_copies(*case[:2]), *case[2:], impl="pallas")
    assert_pools_equal(k, k_exp)
    assert_pools_equal(v, v_exp)
