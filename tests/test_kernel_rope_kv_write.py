"""rope_and_write_kv: the fused Pallas kernel (interpret mode on CPU, real lowering with -m gpu) and
its jnp reference, both against an independent numpy RoPE + slot-by-slot pool update; on fp8 pools
the update stores codes quantized in numpy (``kernel_testing.fp8_codes``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.pallas_kernels.rope_kv_write import (_heads_per_program, apply_rope,
                                                   rope_and_write_kv, rope_and_write_kv_reference)
from kernel_testing import (ABS_TOL, E4M3, E5M2, assert_close, assert_codes_close,
                            assert_pools_equal, fp8_codes)


@dataclasses.dataclass(frozen=True)
class Case:
    qkv: jax.Array  # [T, Hkv, G + 2, D]
    cos: jax.Array  # f32[T, D]
    sin: jax.Array
    k_pool: jax.Array  # [P, bs, Hkv, D]: NaN except a few finite pages
    v_pool: jax.Array
    slots: jax.Array  # i32[T]

    def pools(self):
        """The kernel donates its pools: hand it copies so the originals stay usable."""
        return jnp.array(self.k_pool, copy=True), jnp.array(self.v_pool, copy=True)


def _make_case(seed: int, *, num_pages: int, page_size: int, num_kv_heads: int, group: int,
               head_dim: int, slots: list[int], dtype=jnp.float32, theta: float = 10000.0) -> Case:
    rng = np.random.default_rng(seed)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    pools = []
    for _ in range(2):
        pool = np.full(shape, np.nan, np.float32)
        finite = rng.choice(num_pages, size=max(1, num_pages // 2), replace=False)
        pool[finite] = rng.standard_normal((len(finite),) + shape[1:])
        pools.append(jnp.asarray(pool, dtype))
    num_tokens = len(slots)
    qkv = rng.standard_normal((num_tokens, num_kv_heads, group + 2, head_dim)).astype(np.float32)
    positions = rng.integers(0, 5000, size=num_tokens)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = positions[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float32)
    return Case(jnp.asarray(qkv, dtype), jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles)),
                *pools, jnp.asarray(slots, jnp.int32))


def _numpy_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, D]: rotate pairs (i, i + D/2) by the angle of pair i, in f64."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :half], sin[:, None, :half]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


FP8_SCALES = dict(k_scale=1.0 / 32, v_scale=1.0 / 64)  # codes of N(0, 1) values up to ~200


def _to_fp8(case: Case, dtype) -> Case:
    """The case with its pools as fp8 codes (NaN pages stay NaN)."""
    k_pool, v_pool = (jnp.asarray(fp8_codes(p.astype(jnp.float32), 1.0, dtype))
                      for p in (case.k_pool, case.v_pool))
    return dataclasses.replace(case, k_pool=k_pool, v_pool=v_pool)


def _expected(case: Case, offset: int, scales: dict | None = None):
    """(q [T, Hq, D], k pool, v pool) from numpy: RoPE in f64 and a slot-by-slot update. With
    ``scales`` (an fp8 pool) the rows hold the new V's codes and the new K in code units
    (``k / k_scale``, not rounded: the test bounds the rounding); pools as f64."""
    qkv = np.asarray(case.qkv.astype(jnp.float32), np.float64)
    cos, sin = np.asarray(case.cos, np.float64), np.asarray(case.sin, np.float64)
    num_tokens, num_kv_heads, width, head_dim = qkv.shape
    group = width - 2
    q = _numpy_rope(qkv[:, :, :group].reshape(num_tokens, -1, head_dim), cos, sin)
    k_new = _numpy_rope(qkv[:, :, group], cos, sin)
    v_new = qkv[:, :, group + 1]
    if scales is not None:
        k_new = k_new / scales["k_scale"]
        v_new = fp8_codes(v_new, scales["v_scale"], case.v_pool.dtype).astype(np.float64)
    k, v = (np.array(p.astype(jnp.float32), np.float64) for p in (case.k_pool, case.v_pool))
    page_size, num_slots = k.shape[1], k.shape[0] * k.shape[1]
    for t, slot in enumerate(np.asarray(case.slots)):
        if slot >= 0 and 0 <= slot + offset < num_slots:
            page, row = divmod(int(slot) + offset, page_size)
            k[page, row] = k_new[t]
            v[page, row] = v_new[t]
    return q, k, v


def _assert_k_codes(codes: np.ndarray, exact: np.ndarray, pool_dtype, dtype, what: str) -> None:
    """Written K codes within one fp8 step of the exact roped K in code units, plus the
    activation dtype's absolute tolerance (bf16 RoPE is rounded before it is quantized)."""
    info = jnp.finfo(pool_dtype)
    slack = ABS_TOL[jnp.dtype(dtype)] / FP8_SCALES["k_scale"] + float(info.smallest_subnormal)
    error = np.abs(codes - exact)
    bound = float(info.eps) * np.abs(exact) + slack
    assert (error <= bound).all(), f"{what}: K code error up to {np.max(error - bound):.3g} " \
                                   f"past one step"


def _assert_matches(case: Case, offset: int, got, dtype, scales: dict | None = None, *,
                    v_fraction_off: float = 0.0) -> None:
    """q within the dtype's tolerance; V bit for bit (an fp8 pool: its codes, all but
    ``v_fraction_off`` of them); written K rows within the dtype's tolerance (an fp8 pool:
    ``_assert_k_codes``); every other pool value bit for bit."""
    q_exp, k_exp, v_exp = _expected(case, offset, scales)
    q, k, v = got
    assert q.shape == q_exp.shape and q.dtype == case.qkv.dtype
    assert_close(q, q_exp, dtype, "q")
    written = np.asarray(case.slots) >= 0
    # V is copied exactly (its values come from qkv, already in the pool dtype); roped K is
    # compared with the dtype's tolerance on the written rows and bit for bit everywhere else.
    if v_fraction_off:
        assert_codes_close(v, v_exp, v.dtype, "v", max_fraction_off=v_fraction_off)
    else:
        assert_pools_equal(v, v_exp)
    k_host = np.asarray(k.astype(jnp.float32), np.float64)
    page_size = k_host.shape[1]
    rows = [divmod(int(s) + offset, page_size) for s in np.asarray(case.slots)[written]
            if 0 <= int(s) + offset < k_host.shape[0] * page_size]
    untouched_k, untouched_exp = k_host.copy(), k_exp.copy()
    for page, row in rows:
        if scales is None:
            assert_close(k_host[page, row], k_exp[page, row], dtype, f"k row {page},{row}")
        else:
            _assert_k_codes(k_host[page, row], k_exp[page, row], k.dtype, dtype, f"{page},{row}")
        untouched_k[page, row] = untouched_exp[page, row] = 0.0
    assert_pools_equal(untouched_k, untouched_exp)


# (num_kv_heads, group, head_dim, page_size, dtype): GQA 4 at Llama-3's head layout, MHA, GQA 8,
# a kv head count that is not a power of 2 (two heads per program), D = 64.
CASES = [(8, 4, 128, 16, jnp.bfloat16), (2, 1, 64, 16, jnp.float32), (1, 8, 64, 32, jnp.float32),
         (6, 2, 64, 16, jnp.float32)]
# padding in the middle and at the end, first/last slot of the layer, both sides of a page border
SLOTS = [0, -1, 15, 16, 17, 4 * 16 - 1, 40, -1, -1]


def _slots(page_size: int) -> list[int]:
    return [s * page_size // 16 if s >= 0 else s for s in SLOTS]


@pytest.mark.parametrize("num_kv_heads,group,head_dim,page_size,dtype", CASES)
@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("layer", [0, 1])
def test_matches_numpy(num_kv_heads, group, head_dim, page_size, dtype, impl, layer):
    """Two layers of 4 pages each share one pool; ``slot_offset`` moves slots into layer 1."""
    case = _make_case(layer, num_pages=8, page_size=page_size, num_kv_heads=num_kv_heads,
                      group=group, head_dim=head_dim, slots=_slots(page_size), dtype=dtype)
    offset = layer * 4 * page_size
    got = rope_and_write_kv(case.qkv, case.cos, case.sin, *case.pools(), case.slots,
                            jnp.int32(offset), impl=impl, interpret=True)
    _assert_matches(case, offset, got, dtype)


# (num_kv_heads, group, head_dim, page_size, qkv dtype, pool dtype)
FP8_CASES = [(8, 4, 128, 16, jnp.bfloat16, E4M3), (1, 8, 64, 32, jnp.float32, E5M2),
             (2, 1, 64, 16, jnp.float32, E4M3)]


@pytest.mark.parametrize("num_kv_heads,group,head_dim,page_size,dtype,pool_dtype", FP8_CASES,
                         ids=[f"Hkv{c[0]}-G{c[1]}-D{c[2]}-{c[5].name}" for c in FP8_CASES])
@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_fp8_pool_matches_numpy(num_kv_heads, group, head_dim, page_size, dtype, pool_dtype,
                                impl):
    """Layer 1 of two (a slot offset): roped K and V quantized on store."""
    case = _to_fp8(_make_case(1, num_pages=8, page_size=page_size, num_kv_heads=num_kv_heads,
                              group=group, head_dim=head_dim, slots=_slots(page_size),
                              dtype=dtype), pool_dtype)
    offset = 4 * page_size
    got = rope_and_write_kv(case.qkv, case.cos, case.sin, *case.pools(), case.slots,
                            jnp.int32(offset), **FP8_SCALES, impl=impl, interpret=True)
    assert got[1].dtype == pool_dtype and got[2].dtype == pool_dtype
    _assert_matches(case, offset, got, dtype, FP8_SCALES)


def test_many_tokens_put_several_kv_heads_in_one_program():
    """64 tokens x 8 kv heads: 4 heads per program (the small cases above run one per program)."""
    assert _heads_per_program(64, 8) == 4 and _heads_per_program(1, 8) == 1
    assert _heads_per_program(256, 8) == 8 and _heads_per_program(256, 6) == 2
    rng = np.random.default_rng(11)
    slots = rng.choice(8 * 16, size=64, replace=False).astype(np.int64)
    slots[::7] = -1
    case = _make_case(11, num_pages=8, page_size=16, num_kv_heads=8, group=2, head_dim=32,
                      slots=slots.tolist())
    got = rope_and_write_kv(case.qkv, case.cos, case.sin, *case.pools(), case.slots,
                            impl="pallas", interpret=True)
    _assert_matches(case, 0, got, jnp.float32)


@pytest.mark.parametrize("pool_dtype", [jnp.float32, E4M3], ids=["f32", "e4m3"])
def test_kernel_equals_reference_bit_for_bit_in_f32(pool_dtype):
    """f32 activations: the kernel's and the reference's RoPE agree to f32 rounding, and their
    stored fp8 codes exactly."""
    case = _make_case(7, num_pages=6, page_size=16, num_kv_heads=8, group=4, head_dim=64,
                      slots=[3, 20, -1, 70])
    scales = {}
    if pool_dtype == E4M3:
        case, scales = _to_fp8(case, E4M3), FP8_SCALES
    kernel = rope_and_write_kv(case.qkv, case.cos, case.sin, *case.pools(), case.slots, 16,
                               **scales, impl="pallas", interpret=True)
    reference = rope_and_write_kv_reference(case.qkv, case.cos, case.sin, *case.pools(),
                                            case.slots, 16, **scales)
    np.testing.assert_allclose(np.asarray(kernel[0]), np.asarray(reference[0]), rtol=1e-6,
                               atol=1e-6)
    for got, want in zip(kernel[1:], reference[1:]):
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)),
                                   np.asarray(want.astype(jnp.float32)), rtol=1e-6, atol=1e-6)


def test_slots_outside_the_pool_and_padding_change_nothing():
    case = _make_case(2, num_pages=3, page_size=16, num_kv_heads=2, group=4, head_dim=64,
                      slots=[-1, 3 * 16, -7])
    for impl in ("reference", "pallas"):
        _, k, v = rope_and_write_kv(case.qkv, case.cos, case.sin, *case.pools(), case.slots,
                                    impl=impl, interpret=True)
        assert_pools_equal(k, np.asarray(case.k_pool))
        assert_pools_equal(v, np.asarray(case.v_pool))


def test_group_that_is_not_a_power_of_2_takes_the_reference():
    case = _make_case(3, num_pages=4, page_size=16, num_kv_heads=2, group=3, head_dim=64,
                      slots=[5, -1, 33])
    got = rope_and_write_kv(case.qkv, case.cos, case.sin, *case.pools(), case.slots,
                            impl="pallas", interpret=True)
    _assert_matches(case, 0, got, jnp.float32)


def test_apply_rope_is_rotate_half():
    case = _make_case(4, num_pages=2, page_size=16, num_kv_heads=1, group=2, head_dim=64,
                      slots=[0, 1, 2])
    x = case.qkv[:, 0]  # [T, 4, D] used as 4 heads
    expected = _numpy_rope(np.asarray(x, np.float64), np.asarray(case.cos, np.float64),
                           np.asarray(case.sin, np.float64))
    assert_close(apply_rope(x, case.cos, case.sin), expected, jnp.float32)


def test_pools_are_aliased_under_jit():
    pool = jax.ShapeDtypeStruct((64, 16, 8, 128), jnp.bfloat16)
    text = rope_and_write_kv.trace(
        jax.ShapeDtypeStruct((8, 8, 6, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((8, 128), jnp.float32), jax.ShapeDtypeStruct((8, 128), jnp.float32),
        pool, pool, jax.ShapeDtypeStruct((8,), jnp.int32), impl="pallas",
        interpret=True).lower().as_text()
    assert text.count("tf.aliasing_output") == 2, "both pools must alias an output"


@pytest.mark.parametrize("bad,match", [
    (dict(qkv=jnp.zeros((3, 2, 2, 64))), "qkv"),
    (dict(cos=jnp.zeros((3, 32))), "cos"),
    (dict(sin=jnp.zeros((2, 64))), "sin"),
    (dict(slot_mapping=jnp.zeros((3,), jnp.float32)), "slot_mapping"),
    (dict(k_cache=jnp.zeros((4, 16, 3, 64))), "k_cache"),
    (dict(v_cache=jnp.zeros((4, 16, 2, 64), jnp.bfloat16)), "v_cache"),
    (dict(qkv=jnp.zeros((3, 2, 6, 63)), cos=jnp.zeros((3, 63)), sin=jnp.zeros((3, 63)),
          k_cache=jnp.zeros((4, 16, 2, 63)), v_cache=jnp.zeros((4, 16, 2, 63))), "even"),
])
def test_bad_input_raises_value_error(bad, match):
    args = dict(qkv=jnp.zeros((3, 2, 6, 64)), cos=jnp.zeros((3, 64)), sin=jnp.zeros((3, 64)),
                k_cache=jnp.zeros((4, 16, 2, 64)), v_cache=jnp.zeros((4, 16, 2, 64)),
                slot_mapping=jnp.zeros((3,), jnp.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        rope_and_write_kv(**args, impl="reference")


def _gpu_case(dtype) -> Case:
    rng = np.random.default_rng(5)
    slots = rng.choice(150 * 16, size=200, replace=False).astype(np.int64)
    slots[rng.choice(200, size=30, replace=False)] = -1
    return _make_case(5, num_pages=300, page_size=16, num_kv_heads=8, group=4, head_dim=128,
                      slots=slots.tolist(), dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_on_gpu(dtype):
    case = _gpu_case(dtype)
    got = rope_and_write_kv(case.qkv, case.cos, case.sin, *case.pools(), case.slots,
                            150 * 16, impl="pallas")
    _assert_matches(case, 150 * 16, got, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("pool_dtype", [E4M3, E5M2], ids=lambda d: d.name)
def test_fp8_kernel_on_gpu(pool_dtype):
    """Written K codes within one step of the exact roped K, V codes as numpy's but for the few
    that the GPU's f32 division may round one step apart; every other slot bit for bit."""
    case = _to_fp8(_gpu_case(jnp.bfloat16), pool_dtype)
    got = rope_and_write_kv(case.qkv, case.cos, case.sin, *case.pools(), case.slots, 150 * 16,
                            **FP8_SCALES, impl="pallas")
    _assert_matches(case, 150 * 16, got, jnp.bfloat16, FP8_SCALES, v_fraction_off=1e-3)
