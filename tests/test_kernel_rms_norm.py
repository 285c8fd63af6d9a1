"""fused_add_rms_norm / rms_norm: the Pallas kernel (interpret mode on CPU, the real kernel with
-m gpu) against the jnp reference, and the reference against a float64 numpy RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jaxpaged.pallas_kernels.rms_norm import (MAX_BLOCK_ROWS, MAX_TILE_ELEMENTS, MAX_WARPS,
                                              TARGET_PROGRAMS, RmsNormTuning,
                                              choose_rms_norm_tuning, fused_add_rms_norm,
                                              fused_add_rms_norm_reference, rms_norm,
                                              rms_norm_reference)

EPS = 1e-5
DTYPES = [jnp.bfloat16, jnp.float32]


def _make_inputs(seed: int, num_tokens: int, hidden_size: int, dtype):
    """x and a residual of a larger scale (as in a deep model's stream), a weight near 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, hidden_size))
    residual = 4.0 * rng.standard_normal((num_tokens, hidden_size))
    weight = 1.0 + 0.2 * rng.standard_normal(hidden_size)
    return (jnp.asarray(x, dtype), jnp.asarray(residual, dtype), jnp.asarray(weight, dtype))


def _ordered_bf16_bits(a: jax.Array) -> np.ndarray:
    """bf16 bit patterns mapped to integers that count ulps across zero."""
    bits = np.asarray(a).view(np.uint16).astype(np.int32)
    magnitude = bits & 0x7FFF
    return np.where(bits & 0x8000, -magnitude, magnitude)


def _assert_normed_matches(actual: jax.Array, expected: jax.Array, max_ulps: int = 1) -> None:
    """f32: 1e-6 (the f32 sum of squares may be added in another order). bf16: at most
    ``max_ulps`` anywhere and exact almost everywhere (a 1-ulp change of the mean square flips a
    rounding of the normalized value, which the weight multiply can widen to 2 ulps)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-6, atol=1e-6)
        return
    ulps = np.abs(_ordered_bf16_bits(actual) - _ordered_bf16_bits(expected))
    assert ulps.max() <= max_ulps, f"{ulps.max()} bf16 ulps apart"
    assert np.count_nonzero(ulps) <= max(1, ulps.size // 100), f"{np.count_nonzero(ulps)} differ"


def _assert_bitwise_equal(actual: jax.Array, expected: jax.Array) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(actual.astype(jnp.float32)),
                                  np.asarray(expected.astype(jnp.float32)))


def _numpy_rms_norm(s: np.ndarray, weight: np.ndarray) -> np.ndarray:
    s = s.astype(np.float64)
    return weight.astype(np.float64) * s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [64, 128, 96])
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 37])
def test_fused_kernel_matches_reference(num_tokens, hidden_size, dtype):
    x, residual, weight = _make_inputs(num_tokens * hidden_size, num_tokens, hidden_size, dtype)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, eps=EPS, impl="pallas",
                                              interpret=True)
    _assert_bitwise_equal(new_residual, x + residual)
    expected, _ = fused_add_rms_norm_reference(x, residual, weight, eps=EPS)
    _assert_normed_matches(normed, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [64, 96])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_kernel_without_residual_matches_reference(num_tokens, hidden_size, dtype):
    x, _, weight = _make_inputs(7 + num_tokens, num_tokens, hidden_size, dtype)
    normed = rms_norm(x, weight, eps=EPS, impl="pallas", interpret=True)
    _assert_normed_matches(normed, rms_norm_reference(x, weight, eps=EPS))


@pytest.mark.parametrize("num_tokens,tuning", [
    (37, RmsNormTuning(block_rows=4, num_warps=2)),  # last block has 1 real row of 4
    (3, RmsNormTuning(block_rows=16, num_warps=1)),  # one block, taller than the input
    (16, RmsNormTuning(block_rows=8, num_warps=4)),  # blocks divide T: no row mask
])
@pytest.mark.parametrize("hidden_size", [64, 96])
def test_several_rows_per_program(num_tokens, tuning, hidden_size):
    x, residual, weight = _make_inputs(11, num_tokens, hidden_size, jnp.bfloat16)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, eps=EPS, impl="pallas",
                                              interpret=True, tuning=tuning)
    _assert_bitwise_equal(new_residual, x + residual)
    _assert_normed_matches(normed, fused_add_rms_norm_reference(x, residual, weight, eps=EPS)[0])
    alone = rms_norm(x, weight, eps=EPS, impl="pallas", interpret=True, tuning=tuning)
    _assert_normed_matches(alone, rms_norm_reference(x, weight, eps=EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_rms_norm_of_the_sum(dtype):
    x, residual, weight = _make_inputs(3, 5, 96, dtype)
    normed, new_residual = fused_add_rms_norm_reference(x, residual, weight, eps=EPS)
    expected = _numpy_rms_norm(np.asarray(new_residual.astype(jnp.float32)),
                               np.asarray(weight.astype(jnp.float32)))
    tol = 1e-5 if dtype == jnp.float32 else 1.6e-2  # bf16: two roundings of ~2^-9 relative
    np.testing.assert_allclose(np.asarray(normed.astype(jnp.float32)), expected, rtol=tol,
                               atol=tol)
    sum64 = np.asarray(x.astype(jnp.float32), np.float64) + np.asarray(residual.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(new_residual.astype(jnp.float32)), sum64,
                               rtol=tol / 2)


def test_a_row_of_zeros_normalizes_to_zeros():
    x, residual, weight = _make_inputs(4, 3, 96, jnp.float32)
    x = x.at[1].set(-residual[1])  # the sum's row 1 is exactly 0
    normed, _ = fused_add_rms_norm(x, residual, weight, eps=EPS, impl="pallas", interpret=True)
    assert np.all(np.asarray(normed[1]) == 0)
    assert np.all(np.isfinite(np.asarray(normed)))


def test_auto_on_cpu_is_the_reference():
    """Compared with the reference under jit: XLA's default excess precision lets a jitted bf16
    reference skip rounding the sum before normalizing it (about 1 entry in 5 then differs by
    an ulp from the eager reference, which the kernel follows)."""
    x, residual, weight = _make_inputs(5, 6, 64, jnp.bfloat16)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, eps=EPS)
    ref_normed, ref_residual = jax.jit(fused_add_rms_norm_reference, static_argnames="eps")(
        x, residual, weight, eps=EPS)
    _assert_bitwise_equal(normed, ref_normed)
    _assert_bitwise_equal(new_residual, ref_residual)
    _assert_bitwise_equal(rms_norm(x, weight, eps=EPS),
                          jax.jit(rms_norm_reference, static_argnames="eps")(x, weight, eps=EPS))


def test_no_tokens_gives_empty_outputs():
    x, residual, weight = _make_inputs(6, 0, 64, jnp.bfloat16)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, eps=EPS, impl="pallas",
                                              interpret=True)
    assert normed.shape == (0, 64) and new_residual.shape == (0, 64)
    assert rms_norm(x, weight, eps=EPS, impl="pallas", interpret=True).shape == (0, 64)


@pytest.mark.parametrize("num_tokens", [1, 3, 256, 257, 512, 8192, 100_000])
@pytest.mark.parametrize("hidden_size", [64, 96, 4096, 5120, 8192])
def test_tuning_heuristic(num_tokens, hidden_size):
    tuning = choose_rms_norm_tuning(num_tokens, hidden_size)
    tile = tuning.block_rows * pl.next_power_of_2(hidden_size)
    assert tuning.block_rows <= MAX_BLOCK_ROWS and 1 <= tuning.num_warps <= MAX_WARPS
    assert tile <= max(MAX_TILE_ELEMENTS, pl.next_power_of_2(hidden_size))
    if num_tokens < 2 * TARGET_PROGRAMS:
        assert tuning.block_rows == 1  # decode: one row per program, spread over the SMs
    else:
        assert -(-num_tokens // tuning.block_rows) >= TARGET_PROGRAMS  # still fills the GPU


@pytest.mark.parametrize("field,value", [("block_rows", 3), ("block_rows", 0), ("num_warps", 6),
                                         ("num_warps", 64)])
def test_bad_tuning_raises_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        RmsNormTuning(**{field: value})


@pytest.mark.parametrize("bad,match", [
    (dict(x=jnp.zeros((4, 3, 64), jnp.float32)), "x must be"),
    (dict(x=jnp.zeros((4, 64), jnp.float16), residual=jnp.zeros((4, 64), jnp.float16),
          weight=jnp.zeros((64,), jnp.float16)), "x dtype"),
    (dict(residual=jnp.zeros((5, 64), jnp.float32)), "residual"),
    (dict(residual=jnp.zeros((4, 64), jnp.bfloat16)), "residual"),
    (dict(weight=jnp.zeros((32,), jnp.float32)), "weight"),
    (dict(weight=jnp.zeros((1, 64), jnp.float32)), "weight"),
    (dict(weight=jnp.zeros((64,), jnp.bfloat16)), "weight"),
    (dict(eps=-1.0), "eps"),
])
@pytest.mark.parametrize("fn", [fused_add_rms_norm, fused_add_rms_norm_reference])
def test_bad_input_raises_value_error(fn, bad, match):
    args = dict(x=jnp.zeros((4, 64), jnp.float32), residual=jnp.zeros((4, 64), jnp.float32),
                weight=jnp.ones((64,), jnp.float32), eps=EPS)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fn(**args, impl="pallas", interpret=True)


def test_unknown_impl_raises_value_error():
    x, residual, weight = _make_inputs(8, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="impl"):
        fused_add_rms_norm(x, residual, weight, eps=EPS, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        rms_norm(x, weight, eps=EPS, impl="triton")


@pytest.mark.parametrize("bad,match", [
    (dict(x=jnp.zeros((64,), jnp.float32)), "x must be"),
    (dict(weight=jnp.zeros((65,), jnp.float32)), "weight"),
    (dict(x=jnp.zeros((4, 64), jnp.int32), weight=jnp.zeros((64,), jnp.int32)), "x dtype"),
])
def test_bad_input_without_residual_raises_value_error(bad, match):
    args = dict(x=jnp.zeros((4, 64), jnp.float32), weight=jnp.ones((64,), jnp.float32))
    args.update(bad)
    for fn in (rms_norm, rms_norm_reference):
        with pytest.raises(ValueError, match=match):
            fn(**args, eps=EPS, impl="pallas", interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden_size", [(1, 4096), (256, 4096), (8192, 4096),
                                                    (37, 5120), (300, 8192)])
def test_kernel_on_gpu(num_tokens, hidden_size, dtype):
    x, residual, weight = _make_inputs(9, num_tokens, hidden_size, dtype)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, eps=EPS, impl="pallas")
    ref_normed, ref_residual = fused_add_rms_norm_reference(x, residual, weight, eps=EPS)
    _assert_bitwise_equal(new_residual, ref_residual)
    # On the GPU XLA's reduction adds the squares in another order than the kernel (measured on
    # an H100: 2 ulps at 256 x 4096 in bf16).
    _assert_normed_matches(normed, ref_normed, max_ulps=2)
    _assert_normed_matches(rms_norm(x, weight, eps=EPS, impl="pallas"),
                           rms_norm_reference(x, weight, eps=EPS), max_ulps=2)
