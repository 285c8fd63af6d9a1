"""``sample_results``: a sampler step's ids and logprobs travel as one i32 array and come back
bit for bit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxpaged.runner.sample_results import pack_results, unpack_results
from jaxpaged.sample.sampler import SampleLogprobs, SamplerOutput


def _output(rng: np.random.Generator, batch: int, num_top: int | None) -> SamplerOutput:
    ids = rng.integers(0, 50_000, batch).astype(np.int32)
    if num_top is None:
        return SamplerOutput(ids, None)
    return SamplerOutput(ids, SampleLogprobs(
        top_ids=rng.integers(0, 50_000, (batch, num_top)).astype(np.int32),
        top_logprobs=-rng.exponential(3.0, (batch, num_top)).astype(np.float32),
        sampled_logprob=np.concatenate([[-np.inf, -0.0], -rng.exponential(3.0, batch - 2)]
                                       ).astype(np.float32),
        sampled_rank=rng.integers(1, 50_000, batch).astype(np.int32)))


@pytest.mark.parametrize("num_top", [None, 1, 8, 20])
def test_round_trip_is_exact(num_top):
    out = _output(np.random.default_rng(num_top or 0), 6, num_top)
    packed = jax.jit(pack_results)(out)
    assert packed.shape == (6, 1 if num_top is None else 2 * num_top + 3)
    ids, logprobs = unpack_results(np.asarray(packed))
    np.testing.assert_array_equal(ids, out.token_ids)
    if num_top is None:
        assert logprobs is None
        return
    expected = out.logprobs
    np.testing.assert_array_equal(logprobs.top_ids, expected.top_ids)
    np.testing.assert_array_equal(logprobs.sampled_rank, expected.sampled_rank)
    for got, want in ((logprobs.top_logprobs, expected.top_logprobs),
                      (logprobs.sampled_logprob, expected.sampled_logprob)):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))  # same bits


@pytest.mark.parametrize("bad", [np.zeros((4, 2), np.int32), np.zeros((4, 4), np.int32),
                                 np.zeros(4, np.int32), np.zeros((4, 1), np.float32)])
def test_a_malformed_array_is_refused(bad):
    with pytest.raises(ValueError):
        unpack_results(bad)
