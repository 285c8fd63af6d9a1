"""Lower every kernel for CUDA on the CPU with an abstract H100 (no GPU needed).

Interpret mode does not apply the Triton rules (power-of-2 sizes, 2-D dots >= 16, no slicing of
loaded values, ...); lowering through the real Triton path does, and fails here instead of on the
GPU. Shapes are the serving ones (Llama-3-8B attention: Hq=32, Hkv=8, D=128, 16-token pages, bf16)
plus MHA / GQA-8 / D=64 / f32 variants, and every kernel variant again on fp8 pools (e4m3, some
e5m2) with abstract scales: that they lower at all shows the scales are operands, not static
arguments. Only abstract shapes are used, so a > 4 GiB pool costs nothing and shows that its
offsets are computed in 64 bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import pallas_call_registration
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from jaxpaged.pallas_kernels.kv_write import write_kv
from jaxpaged.pallas_kernels.paged_decode_attention import DecodeTuning, paged_decode_attention
from jaxpaged.pallas_kernels.quant_gemv import GemvTuning
from jaxpaged.pallas_kernels.quant_matmul import MatmulTuning, quant_matmul
from jaxpaged.pallas_kernels.ragged_paged_attention import RaggedTuning, ragged_paged_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
SMALL_POOL, LARGE_POOL = 300, 300_000  # pages; 300k x 16 x 8 x 128 bf16 = 9.2 GiB per pool


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _lower_for_h100(fn, *args, **kwargs) -> str:
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=H100)):
        lowered = fn.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def _pool(pages=SMALL_POOL, kv_heads=8, head_dim=128, page_size=16, dtype=BF16):
    return _sds((pages, page_size, kv_heads, head_dim), dtype)


def _ragged_args(*, tokens=512, seqs=8, width=37, q_heads=32, kv_heads=8, head_dim=128,
                 pages=SMALL_POOL, dtype=BF16, kv_dtype=None):
    pool = _pool(pages, kv_heads, head_dim, dtype=kv_dtype or dtype)
    return (_sds((tokens, q_heads, head_dim), dtype), pool, pool, _sds((seqs, width), I32),
            _sds((seqs,), I32), _sds((seqs + 1,), I32))


# Abstract per-layer scales: lowering with them shows that they are operands of the kernel.
SCALES = dict(k_scale=_sds((), F32), v_scale=_sds((), F32))


def test_write_kv_lowers_with_aliased_pools():
    pool, new = _pool(), _sds((64, 8, 128), BF16)
    text = _lower_for_h100(write_kv, pool, pool, new, new, _sds((64,), I32), impl="pallas")
    assert text.count(TRITON_CALL) == 1
    assert text.count("tf.aliasing_output") == 2


def test_write_kv_lowers_for_a_kv_head_count_that_is_not_a_power_of_2():
    pool, new = _pool(kv_heads=6), _sds((64, 6, 128), BF16)
    assert TRITON_CALL in _lower_for_h100(write_kv, pool, pool, new, new, _sds((64,), I32),
                                          impl="pallas")


def test_write_kv_lowers_for_fp8_pools():
    new = _sds((64, 8, 128), BF16)
    for dtype in (E4M3, E5M2):
        pool = _pool(dtype=dtype)
        text = _lower_for_h100(write_kv, pool, pool, new, new, _sds((64,), I32), **SCALES,
                               impl="pallas")
        assert text.count(TRITON_CALL) == 1
        assert text.count("tf.aliasing_output") == 2


def _scales(kv_dtype) -> dict:
    return SCALES if kv_dtype is not None else {}


RAGGED_TUNINGS = [RaggedTuning(), RaggedTuning(block_q=32, pages_per_step=8, num_warps=8,
                                               num_stages=3)]


@pytest.mark.parametrize("kv_dtype", [None, E4M3], ids=["bf16", "fp8"])
@pytest.mark.parametrize("soft_cap", [None, 30.0])
@pytest.mark.parametrize("tuning", RAGGED_TUNINGS)
def test_ragged_lowers(tuning, soft_cap, kv_dtype):
    text = _lower_for_h100(ragged_paged_attention, *_ragged_args(kv_dtype=kv_dtype),
                           **_scales(kv_dtype), sm_scale=0.088, soft_cap=soft_cap,
                           max_query_len=512, impl="pallas", tuning=tuning)
    assert text.count(TRITON_CALL) == 1


@pytest.mark.parametrize("q_heads,kv_heads,head_dim,dtype,kv_dtype", [
    (32, 32, 128, BF16, None),  # MHA (llama2-7b)
    (64, 8, 64, BF16, None),  # GQA 8, head_dim 64
    (12, 4, 64, BF16, None),  # group of 3: padded to 4 query heads per kv head
    (32, 8, 128, F32, None),  # f32 tiles (full-precision dots)
    (32, 32, 128, BF16, E4M3),  # the same on fp8 pools
    (64, 8, 64, BF16, E5M2),
    (12, 4, 64, BF16, E4M3),
    (32, 8, 128, F32, E4M3),
])
def test_ragged_lowers_for_other_head_layouts(q_heads, kv_heads, head_dim, dtype, kv_dtype):
    args = _ragged_args(q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                        kv_dtype=kv_dtype)
    assert TRITON_CALL in _lower_for_h100(ragged_paged_attention, *args, **_scales(kv_dtype),
                                          sm_scale=0.1, impl="pallas")


@pytest.mark.parametrize("kv_dtype", [None, E4M3], ids=["bf16", "fp8"])
def test_ragged_decode_only_batch_lowers_the_decode_kernel(kv_dtype):
    text = _lower_for_h100(ragged_paged_attention,
                           *_ragged_args(tokens=64, seqs=64, kv_dtype=kv_dtype),
                           **_scales(kv_dtype), sm_scale=0.088, max_query_len=1, impl="pallas")
    assert "paged_decode_attention" in text and TRITON_CALL in text


def test_one_token_per_sequence_skips_the_gather_and_scatter():
    """The engine's decode batches: no XLA gather of q or scatter of the output around the
    kernel (a batch-256 decode step is then the kernel alone)."""
    args = _ragged_args(tokens=256, seqs=256)
    general = _lower_for_h100(ragged_paged_attention, *args, sm_scale=0.088, max_query_len=1,
                              impl="pallas")
    promised = _lower_for_h100(ragged_paged_attention, *args, sm_scale=0.088, max_query_len=1,
                               one_token_per_sequence=True, impl="pallas")
    assert "stablehlo.gather" in general
    assert promised.count(TRITON_CALL) == 1
    for op in ("stablehlo.gather", "stablehlo.select", "stablehlo.scatter"):
        assert op not in promised, op


DECODE_LOWERINGS = [  # (seqs, splits, tuning, Triton kernels)
    (256, None, DecodeTuning(), 1),  # large batch: one split, normalized output
    (1, None, DecodeTuning(), 2),  # small batch: split-K, partials merged by a second kernel
    (1, None, DecodeTuning(combine="xla"), 1),  # ... or in XLA
    (4, 7, DecodeTuning(pages_per_step=8, num_warps=8, num_stages=3), 2),
    (8, 2, DecodeTuning(pages_per_step=1), 2),
    (8, 1, DecodeTuning(mask_steps="every"), 1),
    (8, 3, DecodeTuning(launch_order="head_inner", guard="where"), 2),
    (8, 1, DecodeTuning(mask_steps="every", guard="where", pages_per_step=2), 1),
    (1, 200, DecodeTuning(), 2),  # 256 partials per head in the combine kernel
    (64, 1, DecodeTuning(heads_per_program=2), 1),  # 2 kv heads per program: rows of 512 B
    (4, None, DecodeTuning(heads_per_program=4, pages_per_step=2, num_warps=8), 2),
    (64, 1, DecodeTuning(gather="pages", guard="where", launch_order="head_inner"), 1),
]


@pytest.mark.parametrize("kv_dtype", [None, E4M3], ids=["bf16", "fp8"])
@pytest.mark.parametrize("seqs,splits,tuning,kernels", DECODE_LOWERINGS)
def test_decode_lowers(seqs, splits, tuning, kernels, kv_dtype):
    pool = _pool(dtype=kv_dtype or BF16)
    text = _lower_for_h100(paged_decode_attention, _sds((seqs, 32, 128), BF16), pool, pool,
                           _sds((seqs, 256), I32), _sds((seqs,), I32), **_scales(kv_dtype),
                           sm_scale=0.088, num_kv_splits=splits, impl="pallas", tuning=tuning)
    assert text.count(TRITON_CALL) == kernels


def test_one_split_decode_is_the_kernel_alone():
    """q is read and the output written as [S, Hq, D] by the kernel: no XLA pad, slice or
    clip around it (a small-batch decode step pays for every extra launch)."""
    pool = _pool()
    text = _lower_for_h100(paged_decode_attention, _sds((64, 32, 128), BF16), pool, pool,
                           _sds((64, 128), I32), _sds((64,), I32), sm_scale=0.088,
                           num_kv_splits=1, impl="pallas")
    assert text.count(TRITON_CALL) == 1
    for op in ("stablehlo.pad", "stablehlo.slice", "stablehlo.maximum", "stablehlo.minimum"):
        assert op not in text, op


def test_decode_lowers_with_soft_cap_mha_and_f32():
    for q_heads, kv_heads, dtype, kv_dtype in ((32, 32, BF16, None), (32, 8, F32, None),
                                               (32, 32, BF16, E5M2), (32, 8, F32, E4M3)):
        pool = _pool(kv_heads=kv_heads, dtype=kv_dtype or dtype)
        assert TRITON_CALL in _lower_for_h100(
            paged_decode_attention, _sds((4, q_heads, 128), dtype), pool, pool,
            _sds((4, 64), I32), _sds((4,), I32), **_scales(kv_dtype), sm_scale=0.088,
            soft_cap=50.0, impl="pallas")


@pytest.mark.parametrize("splits", [1, 4])
def test_fp8_decode_reads_fp8_pages_and_copies_no_pool(triton_modules, splits):
    """The pool goes to the kernel as fp8 (no XLA convert of it to bf16); the kernel loads
    f8E4M3FN rows and converts them in registers."""
    pool = _pool(dtype=E4M3)
    text = _lower_for_h100(paged_decode_attention, _sds((4, 32, 128), BF16), pool, pool,
                           _sds((4, 64), I32), _sds((4,), I32), **SCALES, sm_scale=0.088,
                           num_kv_splits=splits, impl="pallas")
    assert "stablehlo.convert" not in text or "300x16x8x128xbf16" not in text
    assert "tensor<300x16x8x128xf8E4M3FN>" in text
    decode = triton_modules[0]
    assert "tensor<128x128x!tt.ptr<f8E4M3FN>>" in decode  # fp8's 8 pages x 16 tokens as rows
    assert "tt.fp_to_fp" in decode and "!tt.ptr<bf16>" in decode  # q and the output stay bf16
    assert "tensor<128x128xf16>" in decode  # tiles converted to f16 (kv_quant.compute_dtype)


def test_fp8_stores_round_to_nearest_even(triton_modules):
    pool, new = _pool(dtype=E4M3), _sds((64, 8, 128), BF16)
    _lower_for_h100(write_kv, pool, pool, new, new, _sds((64,), I32), **SCALES, impl="pallas")
    _lower_for_h100(rope_and_write_kv, _sds((64, 8, 6, 128), BF16), _sds((64, 128), F32),
                    _sds((64, 128), F32), pool, pool, _sds((64,), I32), 4096, **SCALES,
                    impl="pallas")
    for module in triton_modules:
        converts = [line for line in module.splitlines() if "tt.fp_to_fp" in line]
        assert converts and all("rounding = rtne" in line and "f8E4M3FN" in line
                                for line in converts), converts


@pytest.fixture
def triton_modules(monkeypatch):
    """Capture the Triton IR text of every kernel lowered in the test (caches cleared first)."""
    jax.clear_caches()
    modules = []
    lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(pallas_call_registration.lowering, "lower_jaxpr_to_triton_module",
                        capture)
    return modules


def _pool_offsets_are_64_bit(module_text: str, tile: str) -> bool:
    """Whether the page gathers (a ``tile`` of bf16, e.g. "4x16x128") use 64-bit offsets."""
    gathers = [line for line in module_text.splitlines()
               if "tt.addptr" in line and f"tensor<{tile}x!tt.ptr<bf16>>" in line]
    assert gathers, "no page gather found in the kernel"
    return all(f"tensor<{tile}xi64>" in line for line in gathers)


@pytest.mark.parametrize("pages,wide", [(SMALL_POOL, False), (LARGE_POOL, True)])
def test_pools_over_4_gib_use_64_bit_offsets(triton_modules, pages, wide):
    pool = _pool(pages)
    _lower_for_h100(paged_decode_attention, _sds((4, 32, 128), BF16), pool, pool,
                    _sds((4, 64), I32), _sds((4,), I32), sm_scale=0.088, num_kv_splits=1,
                    impl="pallas")
    _lower_for_h100(ragged_paged_attention, *_ragged_args(pages=pages), sm_scale=0.088,
                    impl="pallas")
    new = _sds((64, 8, 128), BF16)
    _lower_for_h100(write_kv, pool, pool, new, new, _sds((64,), I32), impl="pallas")
    decode, ragged, kv_write = triton_modules
    assert _pool_offsets_are_64_bit(decode, "64x128") == wide  # 4 pages x 16 tokens as rows
    assert _pool_offsets_are_64_bit(ragged, "4x16x128") == wide
    assert ("xi64" in kv_write or "i64" in kv_write) == wide


# --------------------------------------------------------------------------------------------------
# RoPE + K/V write: one kernel, both pools aliased, for the model's head layouts.
# --------------------------------------------------------------------------------------------------

from jaxpaged.pallas_kernels.rope_kv_write import rope_and_write_kv  # noqa: E402


@pytest.mark.parametrize("tokens,kv_heads,group,head_dim,dtype,kv_dtype",
                         [(1, 8, 4, 128, BF16, None), (8192, 8, 4, 128, BF16, None),
                          (64, 32, 1, 128, BF16, None), (16, 6, 8, 64, F32, None),
                          (1, 8, 4, 128, BF16, E4M3), (8192, 8, 4, 128, BF16, E4M3),
                          (64, 32, 1, 128, BF16, E5M2), (16, 6, 8, 64, F32, E4M3)])
def test_rope_and_write_kv_lowers_as_one_kernel(tokens, kv_heads, group, head_dim, dtype,
                                                kv_dtype):
    pool = _pool(kv_heads=kv_heads, head_dim=head_dim, dtype=kv_dtype or dtype)
    text = _lower_for_h100(rope_and_write_kv, _sds((tokens, kv_heads, group + 2, head_dim), dtype),
                           _sds((tokens, head_dim), F32), _sds((tokens, head_dim), F32), pool,
                           pool, _sds((tokens,), I32), 4096, **_scales(kv_dtype), impl="pallas")
    assert text.count(TRITON_CALL) == 1
    assert text.count("tf.aliasing_output") == 2


# ------------------------------------------------------------ quantized-weight matmuls (issue 14)
QUANT_MATMUL_LOWERINGS = [  # (M, K, N, kernel, weight dtype, tuning)
    (1, 4096, 6144, "w8a16_pallas", E4M3, None),  # Llama-3-8B qkv, decode
    (1, 14336, 4096, "w8a16_pallas", jnp.int8, MatmulTuning(splits=4)),  # down, split-K
    (256, 4096, 28672, "w8a16_pallas", E4M3, None),  # gate_up
    (2048, 4096, 4096, "w8a16_pallas", jnp.int8, None),  # o, prefill tiles
    (16, 4096, 4096, "w8a8_pallas", E4M3, None),
    (1024, 4096, 6144, "w8a8_pallas", E4M3, MatmulTuning(block_m=64, block_n=128, block_k=128)),
    (7, 576, 960, "w8a16_pallas", E4M3, None),  # SmolLM2 qkv: N = 64 * 15
    (1, 4096, 28672, "w8a16_gemv", E4M3, None),  # gate_up, decode GEMV with split-K
    (8, 14336, 4096, "w8a16_gemv", jnp.int8, GemvTuning(splits=1)),  # down, scaled in-kernel
]


@pytest.mark.parametrize("m,k,n,kernel,dtype,tuning", QUANT_MATMUL_LOWERINGS)
def test_quant_matmul_lowers(m, k, n, kernel, dtype, tuning):
    fn = jax.jit(quant_matmul, static_argnames=("kernel", "tuning", "interpret"))
    text = _lower_for_h100(fn, _sds((m, k), BF16), _sds((n, k), dtype), _sds((n,), F32),
                           kernel=kernel, tuning=tuning)
    assert text.count(TRITON_CALL) == 1
    codes = f"tensor<{n}x{k}x{'f8E4M3FN' if dtype == E4M3 else 'i8'}>"  # output-major codes
    assert codes in text  # the kernel reads the codes: no XLA convert of the weights to bf16
    assert f"tensor<{n}x{k}xbf16>" not in text and f"tensor<{k}x{n}xbf16>" not in text
    assert k == n or f"tensor<{k}x{n}x" not in text  # nor an XLA transpose of them
