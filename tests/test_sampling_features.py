"""The vLLM sampling fields through the engine on the tiny checkpoint, synchronous and async:
logit_bias, allowed_token_ids, bad_words, truncate_prompt_tokens, logprobs / prompt_logprobs = -1,
num_cached_tokens, decoded_token; and no compile after warm-up with them in the mix."""

from __future__ import annotations

import math

import pytest

from jaxpaged import SamplingParams
from jaxpaged.engine.input_processor import InputLimits, InputProcessor
from llm_testing import compilations_during, make_llm, random_prompts, token_ids

PROMPT = {"prompt_token_ids": random_prompts(1, seed=31, low=20, high=20)[0]["prompt_token_ids"]}


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def llm(request, tiny_checkpoint):
    return make_llm(tiny_checkpoint, async_scheduling=request.param, max_logprobs=-1)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **{"max_tokens": 12, **kw})


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_greedy_with_bias_100_generates_the_biased_token(llm):
    out = llm.generate([PROMPT] * 2, [greedy(logit_bias={77: 100.0}),
                                      greedy(logit_bias={"123": 1e6})], use_tqdm=False)
    assert token_ids(out) == [[77] * 12, [123] * 12]


def test_allowed_token_ids_restrict_every_sampled_token(llm):
    allowed = [11, 40, 41, 200, 300]
    prompts = random_prompts(4, seed=32)
    params = [SamplingParams(temperature=1.5, seed=i, max_tokens=16, ignore_eos=True,
                             allowed_token_ids=allowed) for i in range(4)]
    outputs = token_ids(llm.generate(prompts, params, use_tqdm=False))
    assert all(set(ids) <= set(allowed) for ids in outputs)
    assert len(set().union(*outputs)) > 1  # sampling, not a single forced token


def test_bad_words_never_appear_and_ban_only_after_their_prefix(llm):
    """A two-token word taken from the greedy output: greedy then follows the same tokens up to
    the word's first token and must leave the word there."""
    tokenizer = llm.get_tokenizer()
    base = token_ids(llm.generate(PROMPT, greedy(), use_tqdm=False))[0]
    for i in range(1, len(base) - 1):
        word = tokenizer.decode(base[i:i + 2])
        params = greedy(bad_words=[word])
        params.update_from_tokenizer(tokenizer)
        if params.bad_words_token_ids[0] == base[i:i + 2] and base[i] not in base[:i]:
            break
    else:
        pytest.skip("no two-token word in the greedy output tokenizes back to itself")
    got = token_ids(llm.generate(PROMPT, greedy(bad_words=[word]), use_tqdm=False))[0]
    assert got[:i + 1] == base[:i + 1] and got[i + 1] != base[i + 1]
    assert not any(contains(got, ids) for ids in params.bad_words_token_ids)
    single = tokenizer.decode([base[0]])
    got = token_ids(llm.generate(PROMPT, greedy(bad_words=[single]), use_tqdm=False))[0]
    assert base[0] not in got


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    prompt = PROMPT["prompt_token_ids"]
    out = llm.generate(PROMPT, greedy(truncate_prompt_tokens=7), use_tqdm=False)[0]
    alone = llm.generate({"prompt_token_ids": prompt[-7:]}, greedy(), use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt[-7:]
    assert token_ids([out]) == token_ids([alone])
    long = random_prompts(1, seed=33, low=140, high=140)[0]
    out = llm.generate(long, greedy(max_tokens=2, truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert out.prompt_token_ids == long["prompt_token_ids"][-127:]  # max_model_len 128 - 1
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate(PROMPT, greedy(truncate_prompt_tokens=129), use_tqdm=False)


def test_logprobs_minus_one_cover_the_whole_vocabulary(llm):
    vocab = llm.llm_engine.model_config.vocab_size
    whole = llm.generate(PROMPT, greedy(max_tokens=3, logprobs=-1, prompt_logprobs=-1),
                         use_tqdm=False)[0]
    top = llm.generate(PROMPT, greedy(max_tokens=3, logprobs=4, prompt_logprobs=4),
                       use_tqdm=False)[0]
    for entry, small in zip(whole.outputs[0].logprobs, top.outputs[0].logprobs):
        assert len(entry) == vocab
        assert math.fsum(math.exp(lp.logprob) for lp in entry.values()) == pytest.approx(1, 1e-4)
        for token, lp in small.items():
            assert entry[token].logprob == pytest.approx(lp.logprob, abs=1e-5)
            assert entry[token].rank == lp.rank
    assert whole.prompt_logprobs[0] is None
    for entry, small in zip(whole.prompt_logprobs[1:], top.prompt_logprobs[1:]):
        assert len(entry) == vocab
        assert set(small) <= set(entry)


def test_decoded_tokens_of_sampled_logprobs(llm):
    tokenizer = llm.get_tokenizer()
    out = llm.generate(PROMPT, greedy(max_tokens=4, logprobs=3), use_tqdm=False)[0].outputs[0]
    for entry in out.logprobs:
        for token, lp in entry.items():
            assert lp.decoded_token == tokenizer.decode([token])
    plain = llm.generate(PROMPT, greedy(max_tokens=2, logprobs=2, detokenize=False),
                         use_tqdm=False)[0].outputs[0]
    assert all(lp.decoded_token is None for e in plain.logprobs for lp in e.values())


def test_num_cached_tokens_counts_prefix_cache_hits(llm):
    prompt = random_prompts(1, seed=34, low=40, high=40)[0]
    first = llm.generate(prompt, greedy(max_tokens=2), use_tqdm=False)[0]
    again = llm.generate(prompt, greedy(max_tokens=2), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == (40 - 1) // 16 * 16  # the full blocks before the last token
    forked = llm.generate(prompt, SamplingParams(n=2, max_tokens=2, seed=1), use_tqdm=False)[0]
    assert forked.num_cached_tokens == 32


def test_logprobs_minus_one_needs_max_logprobs_minus_one():
    processor = InputProcessor(None, InputLimits(vocab_size=64, max_model_len=32,
                                                 max_logprobs=20, eos_token_id=None,
                                                 all_eos_token_ids=()))
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=field):
            processor.process("r", [1, 2], SamplingParams(**{field: -1}))
    processor.process("r", [1, 2], SamplingParams(logprobs=20, prompt_logprobs=0))


@pytest.mark.parametrize("params, field", [
    (SamplingParams(logit_bias={448: 1.0}), "logit_bias"),
    (SamplingParams(allowed_token_ids=[3, 1000]), "allowed_token_ids"),
    (SamplingParams(bad_words=["x"]), "bad_words"),  # needs a tokenizer here
])
def test_out_of_vocabulary_ids_are_refused_before_queueing(params, field):
    processor = InputProcessor(None, InputLimits(vocab_size=448, max_model_len=32,
                                                 max_logprobs=20, eos_token_id=None,
                                                 all_eos_token_ids=()))
    with pytest.raises(ValueError, match=field):
        processor.process("r", [1, 2], params)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_no_compilation_after_warmup_with_constraints(tiny_checkpoint, async_scheduling):
    llm = make_llm(tiny_checkpoint, async_scheduling=async_scheduling)  # only warm-up compiled
    tokenizer = llm.get_tokenizer()
    word = tokenizer.decode(token_ids(llm.generate(PROMPT, greedy(max_tokens=4),
                                                   use_tqdm=False))[0][2:4])
    prompts = random_prompts(8, seed=35, low=1, high=90)
    params = [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logit_bias={5: 3.0}),
        SamplingParams(temperature=0.8, max_tokens=5, allowed_token_ids=[7, 8, 9], seed=2),
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, bad_words=[word, "the"]),
        SamplingParams(temperature=1.0, max_tokens=3, bad_words=["a"], truncate_prompt_tokens=5),
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.7, max_tokens=8, seed=3, logit_bias={9: -100.0}),
        SamplingParams(temperature=0.0, max_tokens=2, allowed_token_ids=list(range(16))),
        SamplingParams(temperature=1.0, max_tokens=11, ignore_eos=True),
    ]
    assert compilations_during(lambda: llm.generate(prompts, params, use_tqdm=False)) == []
