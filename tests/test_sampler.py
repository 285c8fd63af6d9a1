"""Tests for the on-device sampler and the host-side sampling-tensor builder.

References are independent numpy implementations; distribution checks use many per-row keys in one
call (fixed keys, so the tests are deterministic).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.sample.sampler import SamplerOutput, apply_penalties, sample, sampling_logits
from jaxpaged.sample.tensor_builder import build_sampling_tensors

V = 16  # vocabulary of most tests
sample_jit = jax.jit(sample)


@dataclasses.dataclass
class Params:
    """Stand-in for jaxpaged.SamplingParams (same field names and defaults as vLLM)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = dataclasses.field(default_factory=list)
    bad_words_token_ids: list[list[int]] | None = None


def build(params, pad_to=None, prompts=None, outputs=None, eos=(0,), vocab=V, step=0, **kw):
    n = len(params)
    return build_sampling_tensors(
        params,
        prompts if prompts is not None else [[1, 2]] * n,
        outputs if outputs is not None else [[]] * n,
        eos,
        pad_to or n,
        vocab,
        jax.random.key(step),
        **kw,
    )


def draw_many(logits_row, params, num, vocab=None):
    """num draws from one logits row: one batch of num identical unseeded rows (distinct keys)."""
    vocab = vocab or len(logits_row)
    tensors = build([params] * num, vocab=vocab)
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (num, vocab))
    return np.asarray(sample_jit(logits, tensors).token_ids)


def freqs(tokens, vocab):
    return np.bincount(tokens, minlength=vocab) / len(tokens)


def np_softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def assert_matches(tokens, probs, num_samples):
    """Chi-square (cells with expected >= 5) and total-variation checks against probs."""
    observed = np.bincount(tokens, minlength=len(probs))
    assert observed[probs == 0].sum() == 0, f"drew impossible tokens: {observed}"
    expected = probs * num_samples
    cells = expected >= 5
    chi2 = ((observed[cells] - expected[cells]) ** 2 / expected[cells]).sum()
    dof = max(int(cells.sum()) - 1, 1)
    assert chi2 < dof + 6 * np.sqrt(2 * dof), f"chi2={chi2:.1f} dof={dof} obs={observed} exp={expected}"
    assert 0.5 * np.abs(observed / num_samples - probs).sum() < 0.03


# ---------------------------------------------------------------- greedy


def test_all_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (4, V))
    tensors = build([Params(temperature=0.0)] * 4)
    assert tensors.all_greedy and not tensors.use_penalties
    out = sample_jit(logits, tensors)
    assert isinstance(out, SamplerOutput) and out.logprobs is None
    np.testing.assert_array_equal(out.token_ids, np.argmax(np.asarray(logits), axis=-1))


def test_bf16_logits_greedy():
    logits = jax.random.normal(jax.random.key(2), (4, V)).astype(jnp.bfloat16)
    out = sample_jit(logits, build([Params(temperature=0.0)] * 4))
    np.testing.assert_array_equal(out.token_ids, np.argmax(np.asarray(logits, np.float32), axis=-1))


def test_mixed_batch_greedy_rows_stay_greedy():
    logits_row = np.zeros(V, np.float32)
    logits_row[3] = 0.5  # argmax 3, but a sampled row mostly draws other tokens
    num = 256
    params = [Params(temperature=0.0) if i % 2 == 0 else Params(temperature=1.0) for i in range(num)]
    tensors = build(params)
    assert not tensors.all_greedy
    tokens = np.asarray(sample_jit(jnp.broadcast_to(jnp.asarray(logits_row), (num, V)), tensors).token_ids)
    assert (tokens[0::2] == 3).all()
    assert (tokens[1::2] != 3).sum() > num // 4


# ---------------------------------------------------------------- distributions


def test_temperature_distribution_matches_softmax():
    logits_row = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], np.float32)
    num = 8192
    for temperature in (0.7, 1.5):
        tokens = draw_many(logits_row, Params(temperature=temperature), num)
        assert_matches(tokens, np_softmax(logits_row.astype(np.float64) / temperature), num)


def test_top_k_keeps_only_top_k():
    logits_row = np.array([0.1, 2.0, 0.3, 1.9, 0.0, 1.0, -1.0, 0.5], np.float32)
    num = 4096
    tokens = draw_many(logits_row, Params(temperature=1.0, top_k=2), num)
    probs = np.zeros(8)
    probs[[1, 3]] = np_softmax(logits_row[[1, 3]].astype(np.float64))
    assert set(np.unique(tokens)) == {1, 3}
    assert_matches(tokens, probs, num)


@pytest.mark.parametrize(
    ("top_p", "nucleus"), [(0.4, [0]), (0.7, [0, 1]), (0.8, [0, 1, 2]), (1.0, [0, 1, 2, 3])]
)
def test_top_p_keeps_exactly_the_nucleus(top_p, nucleus):
    base = np.array([0.5, 0.25, 0.15, 0.1])
    order = np.array([2, 0, 3, 1])  # vocab position of base[i]: not already sorted
    probs = np.zeros(4)
    probs[order] = base
    num = 4096
    tokens = draw_many(np.log(probs).astype(np.float32), Params(top_p=top_p), num)
    expected = np.zeros(4)
    expected[order[nucleus]] = base[nucleus] / base[nucleus].sum()
    assert set(np.unique(tokens)) == set(order[nucleus].tolist())
    assert_matches(tokens, expected, num)


@pytest.mark.parametrize(("min_p", "kept"), [(0.35, [0, 1]), (0.25, [0, 1, 2]), (0.9, [0])])
def test_min_p_drops_unlikely_tokens(min_p, kept):
    base = np.array([0.5, 0.25, 0.15, 0.1])
    num = 4096
    tokens = draw_many(np.log(base).astype(np.float32), Params(min_p=min_p), num)
    expected = np.zeros(4)
    expected[kept] = base[kept] / base[kept].sum()
    assert_matches(tokens, expected, num)


def np_filtered_logits(logits, temperature, top_k, top_p, min_p):
    """Independent reference of one sampling row's final logits (vLLM v1 order)."""
    x = np.asarray(logits, np.float64) / temperature
    probs = np_softmax(x)
    x = np.where(probs < min_p * probs.max(), -np.inf, x)
    order = np.argsort(-x, kind="stable")
    keep = np.isfinite(x[order])
    if 0 < top_k < len(x):
        keep &= x[order] >= x[order][top_k - 1]
    kept_probs = np.where(keep, np.exp(x[order] - x[order][0]), 0.0)
    kept_probs /= kept_probs.sum()
    mass_before = np.concatenate([[0.0], np.cumsum(kept_probs)[:-1]])
    if top_p < 1.0:
        keep &= (mass_before < top_p) | (np.arange(len(x)) == 0)
    out = np.full_like(x, -np.inf)
    out[order[keep]] = x[order[keep]]
    return out


def test_sampling_logits_match_numpy_reference():
    rng = np.random.default_rng(0)
    rows = [
        Params(temperature=0.8, top_k=5),
        Params(temperature=1.3, top_p=0.6),
        Params(temperature=0.5, min_p=0.1),
        Params(temperature=1.0, top_k=7, top_p=0.8, min_p=0.05),
        Params(temperature=2.0),
        Params(temperature=0.9, top_k=-1, top_p=0.95),
    ]
    logits = rng.normal(size=(len(rows), V)).astype(np.float32) * 2
    tensors = build(rows)
    assert tensors.use_top_k_top_p_min_p
    got = np.asarray(jax.jit(sampling_logits)(jnp.asarray(logits), tensors))
    for i, p in enumerate(rows):
        want = np_filtered_logits(logits[i], p.temperature, max(p.top_k, 0), p.top_p, p.min_p)
        np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(want), err_msg=f"row {i}")
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[i][finite], want[finite], rtol=1e-5)


def test_min_p_runs_before_top_p_as_in_vllm():
    # min_p=0.3 keeps {0, 1, 2} (renormalised 4/9, 3/9, 2/9); top_p=0.75 on that keeps {0, 1}.
    # Top-p first would keep {0, 1, 2} (mass before token 2 is 0.7 < 0.75).
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
    got = jax.jit(sampling_logits)(logits, build([Params(min_p=0.3, top_p=0.75)], vocab=4))
    np.testing.assert_array_equal(np.isfinite(got[0]), [True, True, False, False])


# ---------------------------------------------------------------- penalties, min_tokens, padding


def np_penalties(logits, prompt, output, presence, frequency, repetition):
    """Independent reference, one row at a time."""
    out = np.array(logits, np.float64)
    seen = set(prompt) | set(output)
    for tok in seen:
        out[tok] = out[tok] / repetition if out[tok] > 0 else out[tok] * repetition
    for tok in set(output):
        count = list(output).count(tok)
        out[tok] -= frequency * count + presence
    return out


def test_penalties_match_numpy():
    rng = np.random.default_rng(1)
    rows = [
        Params(repetition_penalty=1.3, temperature=0.0),
        Params(frequency_penalty=0.7, presence_penalty=-0.4),
        Params(repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=1.1),
        Params(),  # no penalties in a penalty batch
    ]
    prompts = [rng.integers(0, V, size=n).tolist() for n in (5, 9, 1, 3)]
    outputs = [rng.integers(0, V, size=n).tolist() for n in (4, 12, 0, 6)]
    logits = rng.normal(size=(4, V)).astype(np.float32) * 3
    tensors = build(rows, pad_to=6, prompts=prompts, outputs=outputs)
    assert tensors.use_penalties and tensors.prompt_ids.shape == (6, 16)
    padded_logits = np.concatenate([logits, rng.normal(size=(2, V)).astype(np.float32)])
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(padded_logits), tensors))
    for i, p in enumerate(rows):
        want = np_penalties(
            logits[i], prompts[i], outputs[i], p.presence_penalty, p.frequency_penalty, p.repetition_penalty
        )
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6, err_msg=f"row {i}")
    np.testing.assert_array_equal(got[4:], padded_logits[4:])  # padding rows untouched
    # End to end: the greedy row takes the argmax of its penalised logits.
    greedy = np.asarray(sample_jit(jnp.asarray(padded_logits), tensors).token_ids)[0]
    assert greedy == np.argmax(np_penalties(logits[0], prompts[0], outputs[0], 0.0, 0.0, 1.3))


def test_min_tokens_bans_stop_ids():
    logits_row = np.zeros(V, np.float32)
    logits_row[[0, 5, 9]] = [10.0, 9.0, 8.0]  # eos 0 and stop id 5 dominate
    rows = [
        Params(temperature=0.0, min_tokens=3, stop_token_ids=[5]),  # 2 generated: banned
        Params(temperature=0.0, min_tokens=3, stop_token_ids=[5]),  # 3 generated: free
        Params(temperature=0.0, min_tokens=3, ignore_eos=True),  # eos still banned (as vLLM)
        Params(temperature=1.0, min_tokens=5, stop_token_ids=[5]),  # sampling row: never a stop id
    ]
    outputs = [[1, 2], [1, 2, 3], [], [7]]
    tensors = build(rows, outputs=outputs, eos=(0,))
    tokens = np.asarray(sample_jit(jnp.broadcast_to(jnp.asarray(logits_row), (4, V)), tensors).token_ids)
    assert tokens.tolist()[:3] == [9, 0, 5]
    assert tokens[3] not in (0, 5)


def test_padding_rows_are_harmless():
    rng = np.random.default_rng(2)
    rows = [
        Params(temperature=0.0),
        Params(temperature=1.0, seed=7, top_k=4),
        Params(repetition_penalty=1.5),
    ]
    logits = rng.normal(size=(3, V)).astype(np.float32)
    small = sample_jit(jnp.asarray(logits), build(rows, outputs=[[1], [2], [3]]))
    junk = np.full((5, V), np.nan, np.float32)
    junk[0] = 1e30
    big_tensors = build(rows, pad_to=8, outputs=[[1], [2], [3]])
    big = sample_jit(jnp.asarray(np.concatenate([logits, junk])), big_tensors)
    np.testing.assert_array_equal(np.asarray(big.token_ids)[:3], small.token_ids)
    assert ((np.asarray(big.token_ids) >= 0) & (np.asarray(big.token_ids) < V)).all()
    assert (np.asarray(big_tensors.temperature)[3:] == 0).all()


# ---------------------------------------------------------------- seeds


def seeded_stream(seed, counts, row, pad_to, step):
    """Tokens of one seeded request at generation counts `counts`, sitting at `row` of a batch."""
    vocab = 64
    logits = jnp.zeros((pad_to, vocab))  # uniform: every token equally likely
    tokens = []
    for count in counts:
        rows = [Params(temperature=1.0, seed=100 + j) for j in range(pad_to)]
        rows[row] = Params(temperature=1.0, seed=seed)
        outputs = [[1] * (count if j == row else j) for j in range(pad_to)]
        tensors = build(rows, outputs=outputs, vocab=vocab, step=step)
        tokens.append(int(sample_jit(logits, tensors).token_ids[row]))
    return tokens


def test_seeded_request_reproducible_across_batches():
    counts = range(12)
    a = seeded_stream(1234, counts, row=0, pad_to=4, step=0)
    b = seeded_stream(1234, counts, row=3, pad_to=4, step=5)
    c = seeded_stream(1234, counts, row=6, pad_to=8, step=9)
    assert a == b == c
    assert len(set(a)) > 4  # different counters: different draws
    assert seeded_stream(1235, counts, row=0, pad_to=4, step=0) != a
    # A 64-bit seed keeps its high half.
    assert seeded_stream(1234 + (1 << 32), counts, row=0, pad_to=4, step=0) != a


def test_unseeded_rows_draw_different_streams():
    logits = jnp.zeros((8, 64))
    first = sample_jit(logits, build([Params()] * 8, vocab=64, step=0)).token_ids
    second = sample_jit(logits, build([Params()] * 8, vocab=64, step=1)).token_ids
    assert len(set(np.asarray(first).tolist())) > 3
    assert not np.array_equal(first, second)


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(3)
    rows = [
        Params(temperature=0.0, logprobs=3),
        Params(temperature=0.7, repetition_penalty=2.0, logprobs=0),
        Params(temperature=1.0, top_k=3, logprobs=5),
        Params(temperature=1.0),
    ]
    logits = rng.normal(size=(4, V)).astype(np.float32) * 2
    tensors = build(rows, outputs=[[1, 2]] * 4)
    assert tensors.num_logprobs == V  # bucket 20, capped at V=16
    out = sample_jit(jnp.asarray(logits), tensors)
    want = np_log_softmax(logits)
    tokens = np.asarray(out.token_ids)
    lp = out.logprobs
    assert lp.top_ids.shape == (4, 16)
    np.testing.assert_allclose(lp.sampled_logprob, want[np.arange(4), tokens], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lp.top_ids, np.argsort(-want, axis=-1, kind="stable"))
    np.testing.assert_allclose(lp.top_logprobs, -np.sort(-want, axis=-1), rtol=1e-5, atol=1e-6)
    ranks = (want >= want[np.arange(4), tokens][:, None]).sum(-1)
    np.testing.assert_array_equal(lp.sampled_rank, ranks)
    assert lp.sampled_rank[0] == 1  # greedy row without penalties takes the top token


def test_logprobs_bucketing():
    assert build([Params(logprobs=None)], vocab=64).num_logprobs is None
    assert build([Params(logprobs=0)], vocab=64).num_logprobs == 0
    assert build([Params(logprobs=2), Params(logprobs=None)], vocab=64).num_logprobs == 20
    assert build([Params(logprobs=21)], vocab=64).num_logprobs == 40
    assert build([Params(logprobs=-1)], vocab=64).num_logprobs == 64


# ---------------------------------------------------------------- builder and compilation


def test_builder_flags_and_padding():
    t = build([Params(temperature=0.0, top_k=3, top_p=0.5)], pad_to=4)
    assert t.all_greedy and not t.use_top_k_top_p_min_p and t.prompt_ids is None
    t = build([Params(top_k=-1), Params(top_k=V + 5), Params(top_p=1.0)], pad_to=4)
    assert not t.all_greedy and not t.use_top_k_top_p_min_p
    np.testing.assert_array_equal(t.top_k, [0, 0, 0, 0])
    t = build([Params(min_tokens=2, stop_token_ids=[3, 4, 5, 6, 7])], pad_to=2, eos=(0,), outputs=[[1]])
    assert t.banned_ids.shape == (2, 8)
    np.testing.assert_array_equal(t.banned_ids[0, :6], [0, 3, 4, 5, 6, 7])
    assert (np.asarray(t.banned_ids)[1] == -1).all()
    t = build(
        [Params(presence_penalty=0.1)], pad_to=2, penalty_width=32, prompts=[list(range(10))], outputs=[[1]]
    )
    assert t.prompt_ids.shape == t.output_ids.shape == (2, 32)
    np.testing.assert_array_equal(t.has_seed, [False, False])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(params=[Params(temperature=-1.0)]), "temperature"),
        (dict(params=[Params(top_p=0.0)]), "top_p"),
        (dict(params=[Params(top_k=-2)]), "top_k"),
        (dict(params=[Params(min_p=1.5)]), "min_p"),
        (dict(params=[Params(repetition_penalty=0.0)]), "repetition_penalty"),
        (dict(params=[Params(logprobs=-2)]), "logprobs"),
        (dict(params=[Params()] * 3, pad_to=2), "pad_to"),
        (dict(params=[Params()], prompts=[[V]]), "prompt_ids_list"),
        (dict(params=[Params()], outputs=[[1], [2]]), "output_ids_list"),
        (dict(params=[Params()], eos=(V + 1,)), "eos_ids"),
        (dict(params=[Params(stop_token_ids=[-3])]), "stop_token_ids"),
        (
            dict(params=[Params(presence_penalty=1.0)], prompts=[list(range(8))], penalty_width=4),
            "penalty_width",
        ),
    ],
)
def test_builder_rejects_bad_input(kwargs, field):
    params = kwargs.pop("params")
    with pytest.raises(ValueError, match=field):
        build(params, **kwargs)


def test_sample_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="batch_size"):
        sample(jnp.zeros((3, V)), build([Params()], pad_to=4))


def test_one_compile_per_static_flag_combination():
    traces = []

    def traced_sample(logits, tensors):  # a fresh function: its own jit cache
        traces.append(tensors)
        return sample(logits, tensors)

    jitted = jax.jit(traced_sample)
    logits = jnp.zeros((4, V))
    greedy = [Params(temperature=0.0, seed=s) for s in range(4)]
    plain = [Params(temperature=0.5 + 0.1 * s, seed=s) for s in range(4)]
    filtered = [Params(temperature=0.9, top_k=2 + s, top_p=0.9 - 0.1 * s) for s in range(4)]
    for step in range(3):  # values change (temperatures, seeds, keys, lengths): no recompile
        jitted(logits, build(greedy, step=step, outputs=[[1] * step] * 4))
        jitted(logits, build(plain[step:] + greedy[:step], step=step))
    assert jitted._cache_size() == 2
    jitted(logits, build(filtered))
    jitted(logits, build(filtered[:1] + greedy[1:], step=3))
    assert jitted._cache_size() == 3
    jitted(logits, build([Params(logprobs=1)] + greedy[1:]))
    jitted(logits, build([Params(logprobs=5, seed=3)] + plain[1:]))
    assert jitted._cache_size() == 4
    jitted(logits, build([Params(frequency_penalty=0.5)] + plain[1:]))
    assert jitted._cache_size() == len(traces) == 5
