"""The XLA attention path (the CPU's) against a float64 numpy recomputation: mixed ragged batches
and decode batches, GQA/MHA, soft cap, fp8 pools, several context chunk sizes, a table far wider
than any context, and the model entry point's dispatch."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.models.attention import resolve_attention_impl
from jaxpaged.pallas_kernels.ragged_paged_attention_xla import ragged_paged_attention_xla
from kernel_testing import assert_close, dense_attention, make_paged_batch
from test_kernel_attention import (DECODE_SEQ_LENS, MIXED_Q_LENS, MIXED_SEQ_LENS, RAGGED_CASES,
                                   _assert_padding_is_zero)

CONFIGS = [c for c, _ in RAGGED_CASES]


def _xla(batch, config, **kwargs):
    return ragged_paged_attention_xla(*batch.attention_args(), **batch.scale_kwargs(),
                                      sm_scale=config.sm_scale, soft_cap=config.soft_cap,
                                      **kwargs)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("max_query_len,chunk_pages", [(None, 16), (20, 1), (20, 3)])
def test_mixed_batch_matches_numpy(config, max_query_len, chunk_pages):
    batch = make_paged_batch(0, config, q_lens=MIXED_Q_LENS, seq_lens=MIXED_SEQ_LENS,
                             num_padding_tokens=3)
    out = _xla(batch, config, max_query_len=max_query_len, chunk_pages=chunk_pages)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    assert_close(out, dense_attention(batch, sm_scale=config.sm_scale, soft_cap=config.soft_cap),
                 config.dtype, "xla")
    _assert_padding_is_zero(out, batch)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("chunk_pages", [16, 2])
def test_decode_batch_matches_numpy(config, chunk_pages):
    """One token per sequence (tiles of one token), a padding row and padding tokens."""
    seq_lens = DECODE_SEQ_LENS
    batch = make_paged_batch(0, config, q_lens=[1 if n else 0 for n in seq_lens],
                             seq_lens=seq_lens, num_padding_tokens=2)
    out = _xla(batch, config, max_query_len=1, chunk_pages=chunk_pages)
    assert_close(out, dense_attention(batch, sm_scale=config.sm_scale, soft_cap=config.soft_cap),
                 config.dtype, "xla")
    _assert_padding_is_zero(out, batch)


def test_a_wide_table_changes_nothing():
    """Table entries past the contexts (random pages here) are never read: a table 40 chunks
    wider than any context gives the same output."""
    config = CONFIGS[0]
    narrow = make_paged_batch(5, config, q_lens=MIXED_Q_LENS, seq_lens=MIXED_SEQ_LENS)
    num_pages = narrow.k_cache.shape[0]
    junk = np.random.default_rng(1).integers(0, num_pages, (len(MIXED_SEQ_LENS), 640))
    wide = dataclasses.replace(narrow, block_tables=jnp.concatenate(
        [narrow.block_tables, jnp.asarray(junk, jnp.int32)], axis=1))
    np.testing.assert_allclose(np.asarray(_xla(wide, config, chunk_pages=16)),
                               np.asarray(_xla(narrow, config, chunk_pages=16)), rtol=1e-6)


def test_auto_resolves_to_xla_off_the_gpu_and_bad_names_raise():
    assert resolve_attention_impl("auto") == "xla"  # the test machine has no CUDA GPU
    assert resolve_attention_impl("reference") == "reference"
    with pytest.raises(ValueError, match="attention impl must be one of"):
        resolve_attention_impl("triton")


def test_bad_chunk_pages_raises():
    config = CONFIGS[0]
    batch = make_paged_batch(0, config, q_lens=[1], seq_lens=[3])
    with pytest.raises(ValueError, match="chunk_pages must be >= 1"):
        _xla(batch, config, chunk_pages=0)
