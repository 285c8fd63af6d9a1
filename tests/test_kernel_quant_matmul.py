"""Quantized-weight matmuls (pallas_kernels/quant_matmul.py): quantize -> dequantize round trips
within the format's error, and every kernel (Pallas in interpret mode, the XLA candidates) against
its jnp reference. The CUDA lowering of the Pallas kernels is in tests/test_kernel_lowering.py."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpaged.pallas_kernels.quant_matmul import (CODE_MAX, DEQUANT_MIN_ROWS, MatmulTuning,
                                                   choose_kernel, dequantize_weight,
                                                   quant_matmul, quant_matmul_reference,
                                                   quantize_rows, quantize_weight, to_input_major,
                                                   w8a8_reference)
from jaxpaged.pallas_kernels.quant_gemv import GEMV_MAX_ROWS, GemvTuning, quant_gemv
from kernel_testing import relative_error

# Half a step of the format, relative: e4m3 has 3 mantissa bits (2^-4); int8 codes of a
# channel's amax / 127 step are within 0.5 / 127 of amax (an absolute bound per channel).
FP8_HALF_STEP = 2.0 ** -4


def _weights(seed: int, k: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    return w * rng.uniform(0.01, 3.0, size=(1, n)).astype(np.float32)  # channels of mixed ranges


def test_fp8_round_trip_is_within_half_a_step_and_codes_are_numpys():
    w = _weights(0, 256, 48)
    codes, scale = quantize_weight(jnp.asarray(w), "fp8")
    assert codes.dtype == jnp.float8_e4m3fn and scale.shape == (48,) and scale.dtype == jnp.float32
    assert codes.shape == (48, 256)  # output-major: [N, K]
    expected_scale = np.abs(w).max(axis=0) / 448.0
    np.testing.assert_allclose(np.asarray(scale), expected_scale, rtol=1e-6)
    expected_codes = (w / expected_scale).astype(ml_dtypes.float8_e4m3fn).T  # independent: numpy
    assert (np.asarray(codes).astype(np.float32) == expected_codes.astype(np.float32)).mean() > 0.999
    back = np.asarray(dequantize_weight(codes, scale))
    normal = np.abs(w / expected_scale) >= 2.0 ** -6  # e4m3's normal range
    rel = np.abs(back - w)[normal] / np.abs(w)[normal]
    assert rel.max() <= FP8_HALF_STEP * (1 + 1e-6)


def test_int8_round_trip_is_within_half_a_code_per_channel():
    w = _weights(1, 128, 40)
    codes, scale = quantize_weight(jnp.asarray(w), "int8")
    assert codes.dtype == jnp.int8
    step = np.abs(w).max(axis=0) / 127.0  # [N]
    back = np.asarray(dequantize_weight(codes, scale))
    assert (np.abs(back - w) <= 0.5 * step[None, :] * (1 + 1e-5)).all()
    assert np.asarray(codes).min() >= -127 and np.abs(np.asarray(codes)).max() == 127
    expected = np.clip(np.round(w / step[None, :]), -127, 127).T  # [N, K], numpy's rounding
    assert (np.asarray(codes) == expected).mean() > 0.999


def test_multi_axis_weights_have_one_scale_per_output_channel():
    w = _weights(2, 64, 3 * 4 * 8).reshape(64, 3, 4, 8)  # like wqkv [hidden, Hkv, G + 2, D]
    codes, scale = quantize_weight(jnp.asarray(w), "int8")
    assert codes.shape == (3, 4, 8, 64) and scale.shape == (3, 4, 8)  # [*out, K]
    flat_codes, flat_scale = quantize_weight(jnp.asarray(w.reshape(64, -1)), "int8")
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1, 64), np.asarray(flat_codes))
    np.testing.assert_array_equal(np.asarray(to_input_major(codes)),
                                  np.asarray(flat_codes).T.reshape(64, 3, 4, 8))
    back = np.asarray(dequantize_weight(codes, scale))  # [K, *out] again
    assert back.shape == w.shape and np.abs(back - w).max() <= np.abs(w).max() / 127
    np.testing.assert_array_equal(np.asarray(scale).reshape(-1), np.asarray(flat_scale))


def test_zero_channels_and_rows_get_scale_one():
    w = np.zeros((32, 16), np.float32)
    _, scale = quantize_weight(jnp.asarray(w), "fp8")
    assert (np.asarray(scale) == 1.0).all()
    _, row_scale = quantize_rows(jnp.zeros((3, 32), jnp.bfloat16))
    assert (np.asarray(row_scale) == 1.0).all()


def test_reference_is_dequantize_then_matmul():
    w = _weights(3, 96, 32)
    x = np.random.default_rng(4).standard_normal((5, 96)).astype(np.float32)
    codes, scale = quantize_weight(jnp.asarray(w), "fp8")
    expected = x.astype(np.float64) @ np.asarray(dequantize_weight(codes, scale), np.float64)
    out = quant_matmul_reference(jnp.asarray(x), codes, scale)
    assert relative_error(out, expected) < 1e-6


# (M, K, N): decode (M=1 padded to a 16-row tile), M not a tile multiple, N not a power of 2
SHAPES = [(1, 256, 128), (20, 512, 96), (64, 192, 64)]
TUNINGS = [MatmulTuning(), MatmulTuning(block_m=32, block_n=32, block_k=64, splits=2),
           MatmulTuning(block_k=64, splits=None)]  # automatic split count


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w8a16_pallas_kernel_matches_the_reference(fmt, m, k, n):
    w = _weights(5, k, n)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((m, k)), jnp.bfloat16)
    codes, scale = quantize_weight(jnp.asarray(w), fmt)
    expected = quant_matmul_reference(x, codes, scale)
    for tuning in TUNINGS:
        out = quant_matmul(x, codes, scale, kernel="w8a16_pallas", tuning=tuning, interpret=True)
        assert out.shape == (m, n) and out.dtype == jnp.bfloat16
        assert relative_error(out, expected) < 1e-2, tuning  # bf16 output rounding


def test_w8a16_pallas_kernel_in_f32_is_exact_to_f32_rounding():
    w = _weights(7, 128, 64)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 128)), jnp.float32)
    codes, scale = quantize_weight(jnp.asarray(w), "int8")
    out = quant_matmul(x, codes, scale, kernel="w8a16_pallas", interpret=True)
    expected = np.asarray(x, np.float64) @ np.asarray(dequantize_weight(codes, scale), np.float64)
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("kernel", ["w8a8_pallas", "w8a8_xla"])
@pytest.mark.parametrize("m,k,n", SHAPES[:2])
def test_w8a8_kernels_match_their_reference_and_stay_near_w8a16(kernel, m, k, n):
    w = _weights(9, k, n)
    x = jnp.asarray(np.random.default_rng(10).standard_normal((m, k)), jnp.bfloat16)
    codes, scale = quantize_weight(jnp.asarray(w), "fp8")
    out = quant_matmul(x, codes, scale, kernel=kernel, interpret=True)
    assert relative_error(out, w8a8_reference(x, codes, scale)) < 1e-2
    # activations in fp8 cost about half a step more than the weights alone
    assert relative_error(out, quant_matmul_reference(x, codes, scale)) < FP8_HALF_STEP


def test_kernel_choice():
    assert choose_kernel("auto", "fp8", 1, 4096, 4096) == "dequant_xla"  # CPU: the reference
    assert choose_kernel("w8a16_pallas", "int8", 1, 576, 960) == "w8a16_pallas"  # 960 = 64 * 15
    assert choose_kernel("w8a16_pallas", "int8", 1, 576, 24) == "dequant_xla"  # no 16-wide tile
    with pytest.raises(ValueError, match="needs fp8 weights"):
        choose_kernel("w8a8_pallas", "int8", 1, 64, 64)
    with pytest.raises(ValueError, match="kernel must be one of"):
        choose_kernel("cutlass", "fp8", 1, 64, 64)
    with pytest.raises(ValueError, match="block_n must be a power of 2"):
        MatmulTuning(block_n=48)


def test_codes_of_an_unknown_dtype_are_refused():
    with pytest.raises(ValueError, match="weight codes must be one of"):
        quant_matmul(jnp.ones((1, 16)), jnp.ones((16, 16), jnp.bfloat16), jnp.ones((16,)))
    assert CODE_MAX["int8"] == 127.0


def test_codes_in_the_input_major_layout_are_refused():
    codes, scale = quantize_weight(jnp.ones((64, 32)), "fp8")  # codes [32, 64]
    with pytest.raises(ValueError, match=r"codes must be \[N, K=64\]"):
        quant_matmul(jnp.ones((1, 64)), codes.T, scale)


def test_fp8_weights_take_the_fp8_gemm_where_steps_have_no_triton_gemms():
    """The table's W8A8 bound is the token count from which model steps compile without XLA's
    Triton GEMMs (where dequantize + dot stops fusing the conversion)."""
    from jaxpaged.pallas_kernels.quant_matmul import DEQUANT_MAX_TOKENS, KERNEL_BY_TOKENS
    from jaxpaged.runner.compiler_options import TRITON_GEMM_MAX_TOKENS
    assert DEQUANT_MAX_TOKENS == TRITON_GEMM_MAX_TOKENS
    table = dict(KERNEL_BY_TOKENS["fp8"])
    assert table[DEQUANT_MAX_TOKENS] == "dequant_xla" and table[None] == "w8a8_xla"


def test_w8a8_xla_matches_its_reference_on_the_cpu():
    w = _weights(41, 128, 64) / np.sqrt(128)
    x = jnp.asarray(np.random.default_rng(41).standard_normal((24, 128)), jnp.float32)
    codes, scale = quantize_weight(jnp.asarray(w), "fp8")
    out = quant_matmul(x, codes, scale, kernel="w8a8_xla")
    assert out.shape == (24, 64) and out.dtype == jnp.float32
    assert relative_error(out, w8a8_reference(x, codes, scale)) < 1e-5
    assert relative_error(out, x @ w) < 2 * FP8_HALF_STEP


# ---------------------------------------------------------------------- on the GPU (-m gpu)
GPU_SHAPES = [(1, 4096, 6144), (5, 14336, 4096), (16, 14336, 4096), (300, 4096, 4096),
              (1024, 4096, 1024)]
GPU_GEMV_TUNINGS = [None, GemvTuning(splits=1), GemvTuning(block_k=64, block_n=128, num_warps=8)]
GPU_TUNINGS = [None, MatmulTuning(splits=4), MatmulTuning(block_m=128, block_n=128, block_k=64,
                                                          num_warps=8)]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,kernel", [("fp8", "w8a16_gemv"), ("int8", "w8a16_gemv"),
                                        ("fp8", "w8a16_pallas"), ("int8", "w8a16_pallas"),
                                        ("fp8", "w8a8_pallas"), ("fp8", "w8a8_xla")])
@pytest.mark.parametrize("m,k,n", GPU_SHAPES)
def test_kernels_on_gpu_match_their_references(fmt, kernel, m, k, n):
    w = _weights(11, k, n) / np.sqrt(k)
    x = jnp.asarray(np.random.default_rng(12).standard_normal((m, k)), jnp.bfloat16)
    codes, scale = quantize_weight(jnp.asarray(w), fmt)
    reference = w8a8_reference if kernel.startswith("w8a8") else quant_matmul_reference
    expected = reference(x.astype(jnp.float32), codes, scale)  # f32 on the GPU
    tunings = (GPU_TUNINGS if kernel.endswith("pallas") else GPU_GEMV_TUNINGS
               if kernel == "w8a16_gemv" else [None])
    for tuning in tunings:
        out = quant_matmul(x, codes, scale, kernel=kernel, tuning=tuning)
        assert relative_error(out, expected) < 1e-2, tuning


@pytest.mark.gpu
def test_auto_on_gpu_follows_the_table():
    from jaxpaged.pallas_kernels.quant_matmul import KERNEL_BY_TOKENS
    for fmt, table in KERNEL_BY_TOKENS.items():
        for bound, kernel in table:
            m = bound or 4096
            assert choose_kernel("auto", fmt, m, 4096, 4096) == kernel


# ------------------------------------------------------------- the CUDA-core GEMV (quant_gemv.py)
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("m,k,n,tuning", [
    (1, 512, 256, GemvTuning(block_k=32, block_n=64, splits=1)),  # one split: scaled in-kernel
    (3, 768, 128, GemvTuning(block_k=16, block_n=128, splits=4)),  # rows padded to 4, split-K
    (8, 256, 96, None),  # N = 32 * 3: block_n shrinks to 32; automatic splits
])
def test_gemv_matches_the_reference_in_interpret_mode(fmt, m, k, n, tuning):
    w = _weights(21, k, n) / np.sqrt(k)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.float32)
    codes, scale = quantize_weight(jnp.asarray(w), fmt)
    out = quant_matmul(x, codes, scale, kernel="w8a16_gemv", tuning=tuning, interpret=True)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert relative_error(out, quant_matmul_reference(x, codes, scale)) < 1e-5


def test_gemv_takes_only_what_it_can_and_its_own_tuning():
    assert choose_kernel("w8a16_gemv", "fp8", GEMV_MAX_ROWS, 4096, 4096) == "w8a16_gemv"
    assert choose_kernel("w8a16_gemv", "fp8", GEMV_MAX_ROWS + 1, 4096, 4096) == "dequant_xla"
    assert choose_kernel("w8a16_gemv", "int8", 1, 4096, 8 * 15) == "dequant_xla"  # N: no tile
    x, (codes, scale) = jnp.ones((1, 64)), quantize_weight(jnp.ones((64, 32)), "fp8")
    with pytest.raises(ValueError, match="w8a16_gemv takes a GemvTuning"):
        quant_matmul(x, codes, scale, kernel="w8a16_gemv", tuning=MatmulTuning(), interpret=True)
    with pytest.raises(ValueError, match="w8a16_pallas takes a MatmulTuning"):
        quant_matmul(x, codes, scale, kernel="w8a16_pallas", tuning=GemvTuning(), interpret=True)
    with pytest.raises(ValueError, match="quant_gemv takes 1.."):
        quant_gemv(jnp.ones((GEMV_MAX_ROWS + 1, 64)), codes, scale)


@pytest.mark.parametrize("m", [1, 2, DEQUANT_MIN_ROWS, 5])
def test_dequant_xla_pads_few_rows_and_gives_the_same_rows(m):
    w = _weights(31, 64, 48)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 64)), jnp.float32)
    codes, scale = quantize_weight(jnp.asarray(w), "int8")
    out = quant_matmul(x, codes, scale, kernel="dequant_xla")
    assert out.shape == (m, 48)
    # the same rows up to f32 summation order (the CPU's dot may order a 4-row product otherwise)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(quant_matmul_reference(x, codes, scale)), rtol=1e-5,
                               atol=1e-5)
