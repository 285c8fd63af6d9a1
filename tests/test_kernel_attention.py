"""Ragged and decode paged attention: Pallas kernels (interpret mode on CPU; real lowering with
-m gpu) against the jnp references, and the references against a float64 numpy recomputation;
on bf16/f32 pools and on fp8 pools (quantized in numpy under per-tensor scales), whose attention
is also held to a stated bound against exact attention over the unquantized values."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.pallas_kernels.kv_quant import attention_error_bound
from jaxpaged.pallas_kernels.paged_decode_attention import (DecodeTuning, choose_num_kv_splits,
                                                            paged_decode_attention,
                                                            paged_decode_attention_reference)
from jaxpaged.pallas_kernels.ragged_paged_attention import (RaggedTuning, build_work_list,
                                                            ragged_paged_attention)
from kernel_testing import (E4M3, E5M2, AttentionConfig, assert_close, dense_attention,
                            dense_decode_attention, make_decode_batch, make_paged_batch,
                            relative_error)

# A mixed batch: prefill from scratch (20 tokens, off a page border), decode one past a border,
# a running sequence with no new token this step, a prefix-cache hit ending on a border, a padding
# row, a one-token sequence, a longer prefix hit; then 3 padding tokens.
MIXED_Q_LENS = [20, 1, 0, 7, 0, 1, 18]
MIXED_SEQ_LENS = [20, 33, 16, 32, 0, 1, 50]
DECODE_SEQ_LENS = [37, 64, 0, 1, 16, 90]

F32, BF16 = jnp.float32, jnp.bfloat16
RAGGED_CASES = [  # GQA ratio 1/4/8 and a non-power-of-2 group, head_dim 64/128, pages 16/32
    (AttentionConfig(4, 4, 64, 16, F32), RaggedTuning()),
    (AttentionConfig(8, 2, 128, 32, BF16, soft_cap=3.0), RaggedTuning()),
    (AttentionConfig(16, 2, 64, 16, BF16), RaggedTuning()),
    (AttentionConfig(6, 2, 64, 16, F32, soft_cap=5.0), RaggedTuning()),
    (AttentionConfig(8, 2, 64, 16, F32), RaggedTuning(block_q=4, pages_per_step=1)),
    # fp8 pools: MHA / GQA 4 / GQA 8, D 64 / 128, both formats
    (AttentionConfig(4, 4, 64, 16, BF16, kv_dtype=E4M3), RaggedTuning()),
    (AttentionConfig(8, 2, 128, 32, F32, soft_cap=3.0, kv_dtype=E4M3), RaggedTuning()),
    (AttentionConfig(16, 2, 64, 16, BF16, kv_dtype=E5M2), RaggedTuning(block_q=4,
                                                                       pages_per_step=1)),
]
DECODE_CASES = [
    (AttentionConfig(2, 2, 64, 16, F32), None, DecodeTuning()),
    (AttentionConfig(8, 2, 128, 32, BF16, soft_cap=30.0), 3, DecodeTuning()),
    (AttentionConfig(16, 2, 64, 16, BF16), 1, DecodeTuning()),
    (AttentionConfig(8, 2, 64, 16, F32, soft_cap=2.0), 2, DecodeTuning(pages_per_step=1)),
    # the other kernel structures (benchmarked side by side by bench/kernels.py)
    (AttentionConfig(6, 2, 64, 16, F32), 1, DecodeTuning(mask_steps="every")),
    (AttentionConfig(8, 2, 64, 16, F32), 2, DecodeTuning(mask_steps="every", guard="where")),
    (AttentionConfig(8, 2, 64, 16, F32), 1, DecodeTuning(launch_order="head_inner",
                                                         guard="where", pages_per_step=2)),
    (AttentionConfig(12, 4, 64, 16, F32), 3, DecodeTuning(launch_order="head_inner")),
    (AttentionConfig(8, 2, 64, 16, BF16), 5, DecodeTuning(combine="xla")),
    # one program reads several kv heads (block-diagonal q); MHA, GQA 4, a group of 3
    (AttentionConfig(4, 4, 64, 16, F32), None, DecodeTuning(heads_per_program=4)),
    (AttentionConfig(8, 2, 64, 16, F32, soft_cap=3.0), 1,
     DecodeTuning(heads_per_program=2, mask_steps="every")),
    (AttentionConfig(12, 4, 32, 16, BF16), 3,
     DecodeTuning(heads_per_program=2, launch_order="head_inner", guard="where")),
    # the kernel's old structure (page gather + reshape, jnp.where guards), kept for the bench
    (AttentionConfig(8, 2, 64, 16, F32), 2,
     DecodeTuning(gather="pages", guard="where", launch_order="head_inner", combine="xla")),
    (AttentionConfig(8, 2, 64, 16, BF16), 1,
     DecodeTuning(gather="pages", guard="where", mask_steps="every")),
    # fp8 pools: one split and split-K (v_scale on the partials), both guards and gathers, the
    # XLA combine, several kv heads per program; MHA / GQA 4 / GQA 8, D 64 / 128
    (AttentionConfig(2, 2, 64, 16, BF16, kv_dtype=E4M3), None, DecodeTuning()),
    (AttentionConfig(8, 2, 128, 32, F32, soft_cap=30.0, kv_dtype=E4M3), 3, DecodeTuning()),
    (AttentionConfig(16, 2, 64, 16, BF16, kv_dtype=E5M2), 1, DecodeTuning()),
    (AttentionConfig(8, 2, 64, 16, F32, kv_dtype=E4M3), 2,
     DecodeTuning(mask_steps="every", guard="where", combine="xla")),
    (AttentionConfig(8, 2, 64, 16, BF16, kv_dtype=E4M3), 1,
     DecodeTuning(gather="pages", guard="where", launch_order="head_inner")),
    (AttentionConfig(8, 4, 64, 16, F32, kv_dtype=E5M2), 2, DecodeTuning(heads_per_program=2)),
]


def _mixed_batch(config: AttentionConfig, seed: int = 0):
    return make_paged_batch(seed, config, q_lens=MIXED_Q_LENS, seq_lens=MIXED_SEQ_LENS,
                            num_padding_tokens=3)


def _ragged(batch, config, **kwargs):
    return ragged_paged_attention(*batch.attention_args(), **batch.scale_kwargs(),
                                  sm_scale=config.sm_scale, soft_cap=config.soft_cap, **kwargs)


def _decode(batch, config, **kwargs):
    return paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                  batch.seq_lens, **batch.scale_kwargs(),
                                  sm_scale=config.sm_scale, soft_cap=config.soft_cap, **kwargs)


def _assert_padding_is_zero(out, batch):
    assert np.all(np.asarray(out[batch.num_real_tokens:].astype(jnp.float32)) == 0.0)


# ------------------------------------------------------------------------------ references vs numpy

@pytest.mark.parametrize("config", [c for c, _ in RAGGED_CASES], ids=str)
@pytest.mark.parametrize("max_query_len", [None, 20])
def test_ragged_reference_matches_numpy(config, max_query_len):
    batch = _mixed_batch(config)
    out = _ragged(batch, config, impl="reference", max_query_len=max_query_len)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    assert_close(out, dense_attention(batch, sm_scale=config.sm_scale, soft_cap=config.soft_cap),
                 config.dtype, "reference")
    _assert_padding_is_zero(out, batch)


@pytest.mark.parametrize("config", [c for c, _, _ in DECODE_CASES], ids=str)
def test_decode_reference_matches_numpy(config):
    batch = make_decode_batch(0, config, seq_lens=DECODE_SEQ_LENS)
    out = paged_decode_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
        **batch.scale_kwargs(), sm_scale=config.sm_scale, soft_cap=config.soft_cap)
    expected = dense_decode_attention(batch, sm_scale=config.sm_scale, soft_cap=config.soft_cap)
    assert_close(out, expected, config.dtype, "reference")
    assert np.all(np.asarray(out[2].astype(jnp.float32)) == 0.0)  # seq_len 0 -> zeros


# -------------------------------------------------------------------- kernels (interpret) vs both

@pytest.mark.parametrize("config,tuning", RAGGED_CASES, ids=[str(c) for c, _ in RAGGED_CASES])
def test_ragged_kernel_matches_references(config, tuning):
    batch = _mixed_batch(config, seed=1)
    out = _ragged(batch, config, impl="pallas", interpret=True, tuning=tuning)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    assert_close(out, dense_attention(batch, sm_scale=config.sm_scale, soft_cap=config.soft_cap),
                 config.dtype, "kernel vs numpy")
    assert_close(out, _ragged(batch, config, impl="reference"), config.dtype,
                 "kernel vs reference")
    _assert_padding_is_zero(out, batch)


@pytest.mark.parametrize("config,splits,tuning", DECODE_CASES,
                         ids=[f"{c}-splits{s}" for c, s, _ in DECODE_CASES])
def test_decode_kernel_matches_references(config, splits, tuning):
    batch = make_decode_batch(1, config, seq_lens=DECODE_SEQ_LENS)
    out = _decode(batch, config, impl="pallas", interpret=True, num_kv_splits=splits,
                  tuning=tuning)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    expected = dense_decode_attention(batch, sm_scale=config.sm_scale, soft_cap=config.soft_cap)
    assert_close(out, expected, config.dtype, "kernel vs numpy")
    assert_close(out, _decode(batch, config, impl="reference"), config.dtype,
                 "kernel vs reference")
    assert np.all(np.asarray(out[2].astype(jnp.float32)) == 0.0)


def test_ragged_decode_only_batch_takes_the_decode_path():
    """max_query_len=1: a padding row in the middle, padding tokens at the end."""
    config = AttentionConfig(8, 2, 64, 16, F32, soft_cap=10.0)
    batch = make_paged_batch(2, config, q_lens=[1, 1, 0, 1, 1], seq_lens=[17, 32, 0, 1, 40],
                             num_padding_tokens=2)
    expected = dense_attention(batch, sm_scale=config.sm_scale, soft_cap=config.soft_cap)
    for impl in ("pallas", "reference"):
        out = _ragged(batch, config, impl=impl, interpret=True, max_query_len=1)
        assert_close(out, expected, config.dtype, impl)
        _assert_padding_is_zero(out, batch)


def test_decode_batch_with_one_token_per_sequence_uses_the_rows_as_they_are():
    """The engine's decode packing (token s is sequence s's, T == S) with padding rows at the
    end and in the middle: the promise skips the gather/scatter and gives the same output."""
    config = AttentionConfig(8, 2, 64, 16, F32)
    batch = make_paged_batch(4, config, q_lens=[1, 1, 1, 0, 0], seq_lens=[17, 32, 1, 0, 0],
                             num_padding_tokens=2)
    assert batch.q.shape[0] == batch.seq_lens.shape[0]
    expected = dense_attention(batch, sm_scale=config.sm_scale, soft_cap=config.soft_cap)
    for impl in ("pallas", "reference"):
        out = _ragged(batch, config, impl=impl, interpret=True, max_query_len=1,
                      one_token_per_sequence=True)
        assert_close(out, expected, config.dtype, impl)
        _assert_padding_is_zero(out, batch)


def test_one_token_per_sequence_needs_a_decode_batch_of_t_equal_s():
    config = AttentionConfig(8, 2, 64, 16, F32)
    batch = make_paged_batch(5, config, q_lens=[1, 1], seq_lens=[5, 9], num_padding_tokens=1)
    for max_query_len in (1, 2):
        with pytest.raises(ValueError, match="one_token_per_sequence"):
            _ragged(batch, config, impl="reference", max_query_len=max_query_len,
                    one_token_per_sequence=True)


def test_auto_on_cpu_is_the_reference():
    config = AttentionConfig(8, 2, 64, 16, F32)
    batch = _mixed_batch(config, seed=3)
    np.testing.assert_array_equal(np.asarray(_ragged(batch, config)),
                                  np.asarray(_ragged(batch, config, impl="reference")))


# ---------------------------------------------------------------- fp8 pools vs exact attention

# The stated bound on fp8-pool attention against exact attention over the unquantized K/V: eps / 2
# of the format (2^-4 for e4m3, 2^-3 for e5m2; the reasoning is in kv_quant's docstring).
FP8_BOUND = {E4M3: attention_error_bound(E4M3), E5M2: attention_error_bound(E5M2)}


@pytest.mark.parametrize("kv_dtype", [E4M3, E5M2], ids=lambda d: d.name)
def test_fp8_pool_attention_is_within_the_bound_of_exact_attention(kv_dtype):
    """Ragged (mixed batch) and decode kernels on an fp8 pool against exact f64 attention over
    the same values unquantized; the error must also show that quantization happened."""
    exact_config = AttentionConfig(8, 2, 64, 16, F32)
    config = dataclasses.replace(exact_config, kv_dtype=kv_dtype)
    exact = dense_attention(_mixed_batch(exact_config, seed=6), sm_scale=config.sm_scale)
    out = _ragged(_mixed_batch(config, seed=6), config, impl="pallas", interpret=True)
    decode_exact = dense_decode_attention(make_decode_batch(7, exact_config,
                                                            seq_lens=DECODE_SEQ_LENS),
                                          sm_scale=config.sm_scale)
    decode = _decode(make_decode_batch(7, config, seq_lens=DECODE_SEQ_LENS), config,
                     impl="pallas", interpret=True, num_kv_splits=2)
    eps = float(jnp.finfo(kv_dtype).eps)
    for what, got, want in (("ragged", out, exact), ("decode", decode, decode_exact)):
        error = relative_error(got, want)
        assert eps / 32 < error <= FP8_BOUND[kv_dtype], f"{what}: relative-norm error {error:.4f}"


def test_fp8_scales_are_operands_and_a_missing_scale_is_one():
    """A new scale value reuses the compiled function; ``k_scale=None`` reads the codes as is."""
    config = AttentionConfig(8, 2, 64, 16, F32, kv_dtype=E4M3)
    batch = _mixed_batch(config, seed=8)
    compiled = []
    for k_scale in (batch.k_scale, 2 * batch.k_scale):
        out = ragged_paged_attention(*batch.attention_args(), k_scale=k_scale,
                                     v_scale=batch.v_scale, sm_scale=config.sm_scale,
                                     impl="reference")
        compiled.append(ragged_paged_attention._cache_size())
        expected = dense_attention(dataclasses.replace(batch, k_scale=k_scale),
                                   sm_scale=config.sm_scale)
        assert_close(out, expected, F32, f"k_scale={k_scale}")
    assert compiled[0] == compiled[1], "a scale value must not be a static argument"
    out = ragged_paged_attention(*batch.attention_args(), sm_scale=config.sm_scale,
                                 impl="pallas", interpret=True)
    unscaled = dataclasses.replace(batch, k_scale=1.0, v_scale=1.0)  # outputs 32x larger
    assert relative_error(out, dense_attention(unscaled, sm_scale=config.sm_scale)) < 1e-5


def test_fp8_scale_errors():
    config = AttentionConfig(8, 2, 64, 16, F32)
    batch = _mixed_batch(config)
    fp8 = _mixed_batch(dataclasses.replace(config, kv_dtype=E4M3))
    with pytest.raises(ValueError, match="fp8 pools only"):
        _ragged(batch, config, impl="reference", k_scale=0.5)
    with pytest.raises(ValueError, match="fp8 pools only"):
        _decode(make_decode_batch(0, config, seq_lens=[3]), config, v_scale=0.5)
    with pytest.raises(ValueError, match="k_scale must be a scalar"):
        ragged_paged_attention(*fp8.attention_args(), k_scale=jnp.ones((2,)), sm_scale=0.1)
    with pytest.raises(ValueError, match="cannot read an fp8 pool"):
        ragged_paged_attention(fp8.q.astype(jnp.int32), *fp8.attention_args()[1:], sm_scale=0.1)


# ----------------------------------------------------------------------------- pieces and inputs

def test_work_list_covers_every_real_token_once():
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(MIXED_Q_LENS)]), jnp.int32)
    work = np.asarray(build_work_list(qsl, jnp.asarray(MIXED_SEQ_LENS, jnp.int32),
                                      num_tokens=sum(MIXED_Q_LENS) + 3, block_q=4,
                                      max_context=64))
    covered = []
    for seq, q_start, num_rows, first_pos in work:
        if num_rows:
            covered += range(q_start, q_start + num_rows)
            q_len, seq_len = MIXED_Q_LENS[seq], MIXED_SEQ_LENS[seq]
            assert first_pos == seq_len - q_len + (q_start - int(qsl[seq]))
    assert sorted(covered) == list(range(sum(MIXED_Q_LENS)))
    assert work.shape[0] >= sum(-(-q // 4) for q in MIXED_Q_LENS)


def test_split_count_fills_one_wave_only_when_the_batch_is_small():
    assert choose_num_kv_splits(1, 8, 256) == 32  # 1 x 4096 tokens: 256 programs of 8 pages
    assert choose_num_kv_splits(4, 8, 1024) == 16  # 512 programs: one wave of 528
    assert choose_num_kv_splits(8, 8, 256) == 8
    assert choose_num_kv_splits(40, 8, 128) == 1  # 320 programs already fill most of a wave
    assert choose_num_kv_splits(256, 8, 64) == 1
    assert choose_num_kv_splits(1, 8, 4) == 1  # too short to split
    assert choose_num_kv_splits(1, 8, 256, DecodeTuning(target_programs=132,
                                                        min_pages_per_split=16)) == 16


def test_decode_tuning_rejects_unknown_structures():
    for field in ("launch_order", "mask_steps", "guard", "combine"):
        with pytest.raises(ValueError, match=field):
            DecodeTuning(**{field: "fastest"})
    with pytest.raises(ValueError, match="heads_per_program"):
        DecodeTuning(heads_per_program=3)
    with pytest.raises(ValueError, match="gather"):
        DecodeTuning(gather="pages")  # needs guard="where"
    batch = make_decode_batch(0, AttentionConfig(8, 2, 64, 16, F32), seq_lens=[5])
    with pytest.raises(ValueError, match="heads_per_program"):
        _decode(batch, AttentionConfig(8, 2, 64, 16, F32), impl="pallas", interpret=True,
                tuning=DecodeTuning(heads_per_program=4))
    assert choose_num_kv_splits(4, 8, 1024, DecodeTuning(heads_per_program=4)) == 528 // 8


def _args(**over):
    args = dict(q=jnp.zeros((5, 8, 64), F32), k_cache=jnp.zeros((6, 16, 2, 64), F32),
                v_cache=jnp.zeros((6, 16, 2, 64), F32), block_tables=jnp.zeros((2, 3), jnp.int32),
                seq_lens=jnp.zeros((2,), jnp.int32),
                query_start_loc=jnp.zeros((3,), jnp.int32))
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(query_start_loc=jnp.zeros((2,), jnp.int32)), "query_start_loc"),
    (dict(q=jnp.zeros((5, 8, 64), BF16)), "dtype"),
    (dict(q=jnp.zeros((5, 7, 64), F32)), "multiple"),
    (dict(q=jnp.zeros((5, 8, 32), F32)), "head_dim"),
    (dict(seq_lens=jnp.zeros((3,), jnp.int32)), "seq_lens"),
    (dict(block_tables=jnp.zeros((2, 3), jnp.float32)), "block_tables"),
    (dict(v_cache=jnp.zeros((7, 16, 2, 64), F32)), "v_cache"),
    (dict(sm_scale=0.0), "sm_scale"),
    (dict(soft_cap=-1.0), "soft_cap"),
    (dict(max_query_len=0), "max_query_len"),
    (dict(impl="cuda"), "impl"),
])
def test_ragged_bad_input_raises_value_error(over, match):
    kwargs = dict(sm_scale=0.125, impl="reference")
    kwargs.update({k: over.pop(k) for k in list(over) if k in
                   ("sm_scale", "soft_cap", "max_query_len", "impl")})
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(**_args(**over), **kwargs)


def test_decode_bad_input_raises_value_error():
    args = _args(q=jnp.zeros((3, 8, 64), F32))
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(args["q"], args["k_cache"], args["v_cache"], args["block_tables"],
                               args["seq_lens"], sm_scale=0.1)
    with pytest.raises(ValueError, match="num_kv_splits"):
        paged_decode_attention(args["q"][:2], args["k_cache"], args["v_cache"],
                               args["block_tables"], args["seq_lens"], sm_scale=0.1,
                               num_kv_splits=0)


def test_kernel_only_limits_and_tuning_checks():
    args = _args(q=jnp.zeros((5, 8, 48), F32), k_cache=jnp.zeros((6, 16, 2, 48), F32),
                 v_cache=jnp.zeros((6, 16, 2, 48), F32))
    with pytest.raises(ValueError, match="head_dim"):
        ragged_paged_attention(**args, sm_scale=0.1, impl="pallas", interpret=True)
    assert ragged_paged_attention(**args, sm_scale=0.1, impl="reference").shape == (5, 8, 48)
    with pytest.raises(ValueError, match="pages_per_step"):
        DecodeTuning(pages_per_step=3)
    with pytest.raises(ValueError, match="block_q"):
        RaggedTuning(block_q=12)


# ------------------------------------------------------------------------- GPU (real lowering)

GPU_CONFIG = AttentionConfig(32, 8, 128, 16, BF16)
# f32 on the GPU: approximate exp2 and other summation orders than XLA's; bf16 bounds unchanged.
GPU_SLACK = {F32: 10.0, BF16: 1.0}


def _as_f32(batch):
    return dataclasses.replace(batch, q=batch.q.astype(F32), k_cache=batch.k_cache.astype(F32),
                               v_cache=batch.v_cache.astype(F32))


@pytest.mark.gpu
@pytest.mark.parametrize("soft_cap", [None, 5.0])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_ragged_kernel_on_gpu(dtype, soft_cap):
    config = dataclasses.replace(GPU_CONFIG, dtype=dtype, soft_cap=soft_cap)
    batch = make_paged_batch(10, config, q_lens=[300, 1, 1, 0, 77, 1, 129, 0],
                             seq_lens=[700, 1000, 17, 40, 77, 1, 129, 0], num_padding_tokens=5)
    out = _ragged(batch, config, impl="pallas", max_query_len=300)
    expected = _ragged(_as_f32(batch), config, impl="reference", max_query_len=300)
    assert_close(out, expected, dtype, "ragged kernel (GPU) vs f32 reference",
                 slack=GPU_SLACK[dtype])
    _assert_padding_is_zero(out, batch)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 5])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_decode_kernel_on_gpu(dtype, splits):
    config = dataclasses.replace(GPU_CONFIG, dtype=dtype, soft_cap=None)
    batch = make_decode_batch(11, config, seq_lens=[3000, 1, 0, 16, 17, 2048, 999, 64])
    out = _decode(batch, config, impl="pallas", num_kv_splits=splits)
    expected = _decode(_as_f32(batch), config, impl="reference")
    assert_close(out, expected, dtype, "decode kernel (GPU) vs f32 reference",
                 slack=GPU_SLACK[dtype])
    assert np.all(np.asarray(out[2].astype(F32)) == 0.0)


@pytest.mark.gpu
def test_ragged_decode_path_on_gpu():
    config = GPU_CONFIG
    batch = make_paged_batch(12, config, q_lens=[1] * 6 + [0, 1],
                             seq_lens=[1, 15, 16, 17, 500, 4000, 0, 33], num_padding_tokens=8)
    out = _ragged(batch, config, impl="pallas", max_query_len=1)
    expected = _ragged(_as_f32(batch), config, impl="reference", max_query_len=1)
    assert_close(out, expected, config.dtype, "ragged decode path (GPU) vs f32 reference")
    _assert_padding_is_zero(out, batch)


# fp8 pools on the GPU: the kernels against the reference reading the same pool with f32 queries
# (bf16 bounds), and against exact f32 attention over the unquantized values (FP8_BOUND).
GPU_RAGGED = dict(q_lens=[300, 1, 1, 0, 77, 1, 129, 0], seq_lens=[700, 1000, 17, 40, 77, 1, 129, 0],
                  num_padding_tokens=5)
GPU_DECODE_SEQ_LENS = [3000, 1, 0, 16, 17, 2048, 999, 64]


def _check_fp8_on_gpu(out, batch, exact_batch, attend, what: str) -> None:
    kv_dtype = batch.k_cache.dtype
    with_f32_q = dataclasses.replace(batch, q=batch.q.astype(F32))
    assert_close(out, attend(with_f32_q, impl="reference"), BF16, f"{what} vs reference")
    error = relative_error(out, attend(exact_batch, impl="reference"))
    assert error <= FP8_BOUND[kv_dtype], f"{what} vs exact attention: {error:.4f}"


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [E4M3, E5M2], ids=lambda d: d.name)
def test_ragged_kernel_on_gpu_fp8(kv_dtype):
    config = dataclasses.replace(GPU_CONFIG, kv_dtype=kv_dtype)
    exact_config = dataclasses.replace(GPU_CONFIG, dtype=F32)
    batch = make_paged_batch(10, config, **GPU_RAGGED)

    def attend(b, **kwargs):
        return _ragged(b, config, max_query_len=300, **kwargs)

    out = attend(batch, impl="pallas")
    _check_fp8_on_gpu(out, batch, make_paged_batch(10, exact_config, **GPU_RAGGED), attend,
                      "ragged kernel (GPU, fp8 pool)")
    _assert_padding_is_zero(out, batch)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 5])
@pytest.mark.parametrize("kv_dtype", [E4M3, E5M2], ids=lambda d: d.name)
def test_decode_kernel_on_gpu_fp8(kv_dtype, splits):
    config = dataclasses.replace(GPU_CONFIG, kv_dtype=kv_dtype)
    exact_config = dataclasses.replace(GPU_CONFIG, dtype=F32)
    batch = make_decode_batch(11, config, seq_lens=GPU_DECODE_SEQ_LENS)

    def attend(b, **kwargs):
        return _decode(b, config, **kwargs)

    out = attend(batch, impl="pallas", num_kv_splits=splits)
    _check_fp8_on_gpu(out, batch, make_decode_batch(11, exact_config,
                                                    seq_lens=GPU_DECODE_SEQ_LENS),
                      attend, "decode kernel (GPU, fp8 pool)")
    assert np.all(np.asarray(out[2].astype(F32)) == 0.0)


@pytest.mark.gpu
def test_ragged_decode_path_on_gpu_fp8():
    config = dataclasses.replace(GPU_CONFIG, kv_dtype=E4M3)
    shape = dict(q_lens=[1] * 6 + [0, 1], seq_lens=[1, 15, 16, 17, 500, 4000, 0, 33],
                 num_padding_tokens=8)
    batch = make_paged_batch(12, config, **shape)

    def attend(b, **kwargs):
        return _ragged(b, config, max_query_len=1, **kwargs)

    out = attend(batch, impl="pallas")
    exact = make_paged_batch(12, dataclasses.replace(GPU_CONFIG, dtype=F32), **shape)
    _check_fp8_on_gpu(out, batch, exact, attend, "ragged decode path (GPU, fp8 pool)")
    _assert_padding_is_zero(out, batch)
