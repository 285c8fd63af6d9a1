"""logit_bias, allowed_token_ids and bad_words: SamplingParams' checks, the builder's arrays and
the jitted sampler, each against an independent numpy re-computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.sample.sampler import apply_token_constraints, sample
from jaxpaged.sample.tensor_builder import SamplingTensorBuilder
from jaxpaged.sample.token_constraints import MIN_CONSTRAINT_WIDTH
from jaxpaged.sampling_params import SamplingParams
from test_sampler import Params, assert_matches, build, np_softmax

V = 16
sample_jit = jax.jit(sample)


# ---------------------------------------------------------------- SamplingParams


def test_logit_bias_keys_become_ints_and_values_are_clamped_as_in_vllm():
    params = SamplingParams(logit_bias={"3": 250.0, 5: -1e9, 7: 1.5})
    assert params.logit_bias == {3: 100.0, 5: -100.0, 7: 1.5}
    assert SamplingParams(bad_words=["a", "b", "a"]).bad_words == ["a", "b"]
    assert SamplingParams().bad_words == [] and SamplingParams().allowed_token_ids is None
    assert SamplingParams(logprobs=-1, prompt_logprobs=-1).logprobs == -1


@pytest.mark.parametrize("field, value", [
    ("logit_bias", [1, 2]), ("logit_bias", {"x": 1.0}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {1.5: 1.0}), ("logit_bias", {1: "big"}), ("logit_bias", {1: float("nan")}),
    ("allowed_token_ids", []), ("allowed_token_ids", [1, -2]), ("allowed_token_ids", [1.0]),
    ("allowed_token_ids", 3), ("bad_words", "word"), ("bad_words", [""]), ("bad_words", [3]),
    ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", -2),
    ("truncate_prompt_tokens", 1.5), ("prompt_logprobs", -2),
])
def test_bad_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


class FakeTokenizer:
    """encode() from a fixed table, to pin vLLM's with/without-space rule."""

    def __init__(self, table):
        self.table = table

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return list(self.table[text])


def test_bad_words_tokenize_with_and_without_a_leading_space_as_vllm():
    tokenizer = FakeTokenizer({
        "cat": [1], " cat": [2],  # a different single token with the space: both kept
        "dog": [3, 4], " dog": [5],  # spaced form of another length: dropped
        "ox": [6, 7], " ox": [6, 8],  # same first token: dropped
        "emu": [9, 10], " emu": [11, 10],  # same length, other first token: kept
    })
    params = SamplingParams(bad_words=["cat", " dog", "ox", "emu"])
    params.update_from_tokenizer(tokenizer)
    assert params.bad_words_token_ids == [[1], [2], [3, 4], [6, 7], [9, 10], [11, 10]]
    assert params.clone().bad_words_token_ids == params.bad_words_token_ids
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["void"]).update_from_tokenizer(FakeTokenizer({"void": []}))


# ---------------------------------------------------------------- numpy references


def np_constrained(logits, bias=None, allowed=None, banned=()):
    """vLLM's order: allowed mask, bad-word bans, then the bias (all before penalties)."""
    out = np.asarray(logits, np.float64).copy()
    if allowed is not None:
        mask = np.ones(len(out), bool)
        mask[list(allowed)] = False
        out[mask] = -np.inf
    out[list(banned)] = -np.inf
    for token, value in (bias or {}).items():
        out[token] += value
    return out


def np_bad_word_bans(words, past):
    """vllm/v1/sample/ops/bad_words.py re-done on the whole list of generated tokens."""
    banned = set()
    for word in words:
        if len(word) > len(past) + 1:
            continue
        prefix = list(word[:-1])
        if (past[len(past) - len(prefix):] if prefix else []) == prefix:
            banned.add(word[-1])
    return banned


def draws(logits_row, params, num):
    tensors = build([params] * num, vocab=len(logits_row))
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (num, len(logits_row)))
    return np.asarray(sample_jit(logits, tensors).token_ids)


# ---------------------------------------------------------------- the sampler


def test_logit_bias_distribution_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=V)
    bias = {2: 1.5, 9: -2.0, 11: 3.0}
    tokens = draws(logits, Params(logit_bias=bias), 4000)
    assert_matches(tokens, np_softmax(np_constrained(logits, bias=bias)), 4000)


def test_allowed_token_ids_restrict_every_sample_and_keep_the_distribution():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=V)
    allowed = [1, 4, 5, 13]
    tokens = draws(logits, Params(allowed_token_ids=allowed, temperature=1.3), 4000)
    assert set(tokens.tolist()) <= set(allowed)
    assert_matches(tokens, np_softmax(np_constrained(logits, allowed=allowed) / 1.3), 4000)


def test_greedy_with_a_large_bias_takes_the_biased_token():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(8, V)) * 5, jnp.float32)
    params = [Params(temperature=0.0, logit_bias={t: 100.0}) for t in range(8)]
    out = sample_jit(logits, build(params))
    np.testing.assert_array_equal(out.token_ids, np.arange(8))


def test_constraints_run_before_penalties_in_vllm_order():
    """A bias that turns a logit positive is then divided by the repetition penalty (vLLM adds
    the bias first); the greedy picks match numpy over many random rows."""
    rng = np.random.default_rng(3)
    rows = 64
    logits = rng.normal(size=(rows, V)) * 2
    prompts = [rng.integers(0, V, 4).tolist() for _ in range(rows)]
    params, want = [], []
    for i in range(rows):
        bias = {int(t): float(b) for t, b in zip(rng.choice(V, 4, replace=False),
                                                 rng.normal(size=4) * 3)}
        allowed = rng.choice(V, 10, replace=False).tolist()
        params.append(Params(temperature=0.0, repetition_penalty=1.8, logit_bias=bias,
                             allowed_token_ids=allowed))
        biased = np_constrained(logits[i], bias=bias, allowed=allowed)
        seen = np.zeros(V, bool)
        seen[prompts[i]] = True
        penalized = np.where(biased > 0, biased / 1.8, biased * 1.8)
        want.append(int(np.argmax(np.where(seen, penalized, biased))))
    out = sample_jit(jnp.asarray(logits, jnp.float32), build(params, prompts=prompts))
    np.testing.assert_array_equal(out.token_ids, want)


def test_bad_word_bans_match_vllm_with_the_last_token_known_or_in_flight():
    """Random generated tokens and bad words (many matching a suffix); the last token is on the
    host or still in flight (read from the previous step's ids on the device)."""
    rng = np.random.default_rng(4)
    builder = SamplingTensorBuilder(V, eos_ids=[0])
    prev_ids = jnp.asarray(rng.integers(0, V, 8), jnp.int32)  # the previous step's samples
    for trial in range(40):
        rows = 4
        params, outputs, counts, prev_rows, want = [], [], [], {}, []
        for i in range(rows):
            past = rng.integers(1, V, rng.integers(0, 6)).tolist()
            words = [rng.integers(1, V, rng.integers(1, 4)).tolist() for _ in range(3)]
            words += [past[-k:] + [int(rng.integers(1, V))] for k in (1, 2) if len(past) >= k]
            in_flight = bool(past) and rng.random() < 0.5
            if in_flight:  # the last generated token is still on the device
                prev_rows[(trial, i)] = int(rng.integers(0, 8))
                past[-1] = int(prev_ids[prev_rows[(trial, i)]])
            params.append(Params(bad_words=["w"], bad_words_token_ids=words))
            outputs.append(past[:-1] if in_flight else past)
            counts.append(len(past))
            want.append(np_bad_word_bans(words, past))
        tensors = builder.build([(trial, i) for i in range(rows)], params, [[1]] * rows,
                                outputs, rows, np.zeros(2, np.uint32), num_generated=counts,
                                prev_rows=prev_rows)
        c = tensors.constraints
        logits = apply_token_constraints(jnp.zeros((rows, V)), c, c.last_tokens(prev_ids))
        got = [set(np.flatnonzero(np.isneginf(np.asarray(row))).tolist()) for row in logits]
        assert got == want, trial


def test_banned_bad_word_is_not_sampled_greedy():
    logits = jnp.asarray(np.eye(V)[[5, 5, 5]] * 10, jnp.float32)  # token 5 is the top
    word = Params(temperature=0.0, bad_words=["w"], bad_words_token_ids=[[2, 3, 5]])
    out = sample_jit(logits, build([word] * 3, outputs=[[2, 3], [1, 3], [3]]))
    assert out.token_ids.tolist()[0] != 5 and out.token_ids.tolist()[1:] == [5, 5]


# ---------------------------------------------------------------- builder and compilation


def test_plain_batches_carry_no_constraints_and_widths_are_bucketed():
    assert build([Params(temperature=0.0), Params()]).constraints is None
    t = build([Params(logit_bias={1: 1.0}), Params()], pad_to=4)
    assert t.constraints.bias_ids.shape == (4, MIN_CONSTRAINT_WIDTH)
    np.testing.assert_array_equal(t.constraints.bias_ids[:, 0], [1, -1, -1, -1])
    assert (t.constraints.allowed_ids == -1).all()  # no row restricts: every token allowed
    t = build([Params(allowed_token_ids=list(range(V)) * 2)], vocab=V)
    assert t.constraints.allowed_ids.shape == (1, 2 * MIN_CONSTRAINT_WIDTH)


@pytest.mark.parametrize("params, field", [
    (Params(logit_bias={V: 1.0}), "logit_bias"),
    (Params(allowed_token_ids=[0, V + 2]), "allowed_token_ids"),
    (Params(bad_words=["w"], bad_words_token_ids=[[V]]), "bad_words"),
    (Params(bad_words=["w"]), "bad_words"),  # never tokenized
])
def test_builder_rejects_bad_constraints(params, field):
    with pytest.raises(ValueError, match=field):
        build([params])


def test_in_flight_token_without_a_previous_row_is_refused():
    builder = SamplingTensorBuilder(V, eos_ids=[0])
    word = Params(bad_words=["w"], bad_words_token_ids=[[2, 3]])
    with pytest.raises(ValueError, match="in-flight"):
        builder.build(["a"], [word], [[1]], [[2]], 1, np.zeros(2, np.uint32), num_generated=[2])


def test_constraint_content_changes_do_not_recompile():
    traces = []

    def traced(logits, tensors, prev):
        traces.append(tensors)
        return sample(logits, tensors, prev)

    jitted = jax.jit(traced)
    logits, prev = jnp.zeros((4, V)), jnp.zeros(4, jnp.int32)
    for step in range(3):
        params = [Params(temperature=0.0, logit_bias={step: 2.0}),
                  Params(temperature=0.0, allowed_token_ids=[1, step + 2]),
                  Params(temperature=0.0, bad_words=["w"], bad_words_token_ids=[[step + 1, 4]]),
                  Params(temperature=0.0)]
        jitted(logits, build(params, outputs=[[1] * step] * 4), prev)
    assert jitted._cache_size() == len(traces) == 1
    jitted(logits, build([Params(temperature=0.0)] * 4), prev)  # no constraints: its own program
    assert jitted._cache_size() == 2
