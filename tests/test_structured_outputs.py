"""Structured outputs (vLLM's ``StructuredOutputsParams``): llguidance grammars enforced on the
device by the sampler's token bitmask. The tiny random-weight checkpoint prefers arbitrary text,
so every constraint must hold against the model's own preferences."""

from __future__ import annotations

import json
import re
import threading

import jax.numpy as jnp
import jsonschema
import llguidance.numpy
import numpy as np
import pytest

from llm_testing import compilations_during, make_llm
from jaxpaged import SamplingParams, StructuredOutputsParams
from jaxpaged.structured.backend import GuidanceBackend, json_whitespace
from jaxpaged.structured.bitmask import apply_grammar_bitmask, bitmask_width

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                 "minItems": 1, "maxItems": 2},
        "owner": {"type": "object",
                  "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99},
                                 "ok": {"type": "boolean"}},
                  "required": ["age", "ok"], "additionalProperties": False},
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{2,4}-\d{2}"
CHOICES = ["yes", "no", "maybe not"]
NO_GRAMMAR = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def constrained(seed: int, temperature: float = 1.0, max_tokens: int = 160,
                **constraint) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**constraint))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return make_llm(tiny_checkpoint, max_model_len=256, max_num_seqs=32,
                    max_num_batched_tokens=64)


def test_bitmask_matches_llguidance_reference():
    """The device unpacking equals llguidance's own numpy masking, vocab not a multiple of 32."""
    rng = np.random.default_rng(0)
    vocab = 70
    mask = rng.integers(-2**31, 2**31, size=(3, bitmask_width(vocab)), dtype=np.int64)
    mask = mask.astype(np.int32)
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    expected = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, mask)
    got = np.asarray(apply_grammar_bitmask(jnp.asarray(logits), jnp.asarray(mask)))
    np.testing.assert_array_equal(got, expected)


def test_params_are_vllms():
    assert StructuredOutputsParams(json='{"type": "object"}').json == {"type": "object"}
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structural_tag"):
        StructuredOutputsParams(structural_tag="{}")
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})


def test_invalid_constraints_fail_when_added(llm):
    for constraint in (dict(regex="[unclosed"), dict(grammar="start: undefined_rule")):
        with pytest.raises(ValueError, match="structured_outputs"):
            llm.generate(["hi"], constrained(0, **constraint), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.slow
def test_json_schema_samples_validate(llm):
    """200 seeded samples in one batch all parse and validate; greedy rows without a grammar in
    the same batch give the tokens they give alone."""
    alone = llm.generate(["The train", "Numbers"], NO_GRAMMAR, use_tqdm=False)
    params = [constrained(seed, disable_any_whitespace=True, json=SCHEMA) for seed in range(200)]
    prompts = ["Write:"] * 200 + ["The train", "Numbers"]
    outputs = llm.generate(prompts, params + [NO_GRAMMAR] * 2, use_tqdm=False)
    for output in outputs[:200]:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert len({o.outputs[0].text for o in outputs[:200]}) > 20  # really sampled
    assert [o.outputs[0].token_ids for o in outputs[200:]] == [o.outputs[0].token_ids
                                                                for o in alone]


@pytest.mark.slow
def test_regex_choice_grammar_and_json_object(llm):
    params = ([constrained(s, regex=REGEX) for s in range(8)]
              + [constrained(s, choice=CHOICES) for s in range(8)]
              + [constrained(s, grammar='start: "x" ("+" DIGIT)* \nDIGIT: /[0-9]/',
                             max_tokens=200) for s in range(4)]
              + [constrained(s, json_object=True, disable_any_whitespace=True, max_tokens=200)
                 for s in range(4)]
              + [constrained(0, temperature=0.0, regex=REGEX)])
    outputs = llm.generate(["Hello"] * len(params), params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outputs]
    assert all(re.fullmatch(REGEX, t) for t in texts[:8] + texts[-1:]), texts
    assert all(t in CHOICES for t in texts[8:16]), texts[8:16]
    for output in outputs[16:20]:
        completion = output.outputs[0]
        text = completion.text
        assert re.fullmatch(r"x(\+[0-9])*", text), text
    for output in outputs[20:24]:
        completion = output.outputs[0]
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
        else:  # max_tokens still applies: a prefix of an object
            assert completion.finish_reason == "length" and completion.text.startswith("{")
    assert all(o.outputs[0].finish_reason == "stop" for o in outputs[:16])


def _outside_strings(text: str) -> str:
    """``text`` without its JSON string literals (a trailing unclosed one too)."""
    return re.sub(r'"(?:[^"\\]|\\.)*("|$)', "", text)


def test_json_whitespace_default_is_vllms(llm):
    """vLLM's guidance backend lets any JSON whitespace come between tokens unless
    disable_any_whitespace (llguidance ``whitespace_flexible``): the random model, which likes
    spaces and carriage returns, fills its objects with them by default and writes compact JSON
    when told."""
    assert json_whitespace(StructuredOutputsParams(json_object=True), {}) == {
        "whitespace_flexible": True}

    def texts(**options):
        params = [constrained(s, json_object=True, max_tokens=100, **options) for s in range(8)]
        return [o.outputs[0] for o in llm.generate(["Write:"] * 8, params, use_tqdm=False)]
    loose = texts()
    assert all(isinstance(json.loads(c.text), dict) for c in loose if c.finish_reason == "stop")
    assert sum(bool(re.search(r"\s", _outside_strings(c.text))) for c in loose) >= 4, loose
    compact = texts(disable_any_whitespace=True)
    assert not any(re.search(r"\s", _outside_strings(c.text)) for c in compact), compact


def test_json_whitespace_runs_are_unbounded_by_default(llm):
    engine = llm.llm_engine
    backend = GuidanceBackend(engine.tokenizer, engine.model_config.vocab_size, [])

    def accepts(text: str, **options) -> bool:
        params = StructuredOutputsParams(json={"type": "object"}, **options)
        matcher = backend.compile(backend.grammar(params))
        tokens = engine.tokenizer.encode(text, add_special_tokens=False)
        return matcher.consume_tokens(tokens) and matcher.is_accepting()
    spaced = "{" + "\n" * 300 + '"a"' + " " * 300 + ": 1}"
    assert accepts(spaced) and accepts('{"a":1}')
    assert not accepts(spaced, disable_any_whitespace=True)
    assert accepts('{"a":1}', disable_any_whitespace=True)
    assert accepts('{"a": 1}', whitespace_pattern="[ ]?")
    assert not accepts('{"a":  1}', whitespace_pattern="[ ]?")


def test_json_options_are_refused_where_they_do_nothing(llm):
    with pytest.raises(ValueError, match="disable_any_whitespace applies to json"):
        StructuredOutputsParams(regex="a+", disable_any_whitespace=True)
    with pytest.raises(ValueError, match="set one"):
        StructuredOutputsParams(json_object=True, disable_any_whitespace=True,
                                whitespace_pattern=" ?")
    schema = {"type": "object", "x-guidance": {"whitespace_flexible": True}}
    with pytest.raises(ValueError, match="x-guidance"):
        llm.generate(["A"], constrained(0, json=schema, disable_any_whitespace=True),
                     use_tqdm=False)
    [output] = llm.generate(["A"], constrained(0, json=schema, max_tokens=4), use_tqdm=False)
    assert output.outputs[0].text.startswith("{")


@pytest.mark.slow
def test_grammars_compile_off_the_step_loop_and_are_cached(llm, monkeypatch):
    """A request waits outside the scheduler while its grammar compiles in the grammar threads;
    the other requests keep stepping; a constraint seen before is not compiled again."""
    engine = llm.llm_engine
    llm.generate(["A"], constrained(0, max_tokens=1, regex="z+"), use_tqdm=False)
    cache, release, threads = engine.structured.cache, threading.Event(), []
    compile_grammar = cache.backend.compile

    def slow_compile(grammar):
        threads.append(threading.current_thread().name)
        release.wait(60)
        return compile_grammar(grammar)
    monkeypatch.setattr(cache.backend, "compile", slow_compile)
    params = constrained(0, regex="q[a-c]{3}x", max_tokens=10)
    engine.add_request("slow", None, params, prompt_token_ids=[5, 6, 7])
    engine.add_request("plain", None, NO_GRAMMAR, prompt_token_ids=[5, 6, 7])
    finished = {}
    while "plain" not in finished:
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        assert "slow" not in engine.scheduler.requests
    release.set()
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert re.fullmatch("q[a-c]{3}x", finished["slow"].outputs[0].text)
    assert threads and all(name.startswith("jaxpaged-grammar") for name in threads)
    again = StructuredOutputsParams(regex="q[a-c]{3}x")
    assert cache.submit(again) is cache.submit(params.structured_outputs)
    assert len(threads) == 1


def test_max_tokens_still_applies(llm):
    [output] = llm.generate(["Hi"], constrained(0, max_tokens=3, json=SCHEMA), use_tqdm=False)
    assert output.outputs[0].finish_reason == "length"
    assert len(output.outputs[0].token_ids) == 3
    assert output.outputs[0].text.startswith('{')


def test_n_samples_each_follow_the_grammar(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(choice=CHOICES))
    [output] = llm.generate(["Pick"], params, use_tqdm=False)
    assert [c.text in CHOICES for c in output.outputs] == [True] * 3


def test_no_compilation_after_warmup_with_grammars(llm):
    def run():
        params = [constrained(s, regex=REGEX) for s in range(3)]
        params += [constrained(0, temperature=0.0, choice=CHOICES), NO_GRAMMAR,
                   SamplingParams(temperature=0.7, seed=1, max_tokens=5)]
        llm.generate(["Hello", "A", "The", "B", "C", "D"], params, use_tqdm=False)
    run()  # grammars compile (llguidance, not XLA) the first time
    assert compilations_during(run) == []


@pytest.mark.slow
def test_synchronous_engine_gives_the_same_outputs(tiny_checkpoint, llm):
    """Without async scheduling the masks come from the same grammar states: equal outputs."""
    sync = make_llm(tiny_checkpoint, max_model_len=256, max_num_seqs=32,
                    max_num_batched_tokens=64, async_scheduling=False)
    params = ([constrained(s, regex=REGEX) for s in range(3)]
              + [constrained(s, disable_any_whitespace=True, json=SCHEMA) for s in range(3)])
    texts = [[o.outputs[0].text for o in engine.generate(["Go"] * 6, params, use_tqdm=False)]
             for engine in (llm, sync)]
    assert texts[0] == texts[1]
    assert all(re.fullmatch(REGEX, t) for t in texts[1][:3])


def test_padded_vocabulary_ids_are_never_allowed(llm):
    """The model's vocab_size pads the tokenizer's: ids past the tokenizer are masked out."""
    from jaxpaged.core.scheduler_output import ScheduledRequest

    engine = llm.llm_engine
    llm.generate(["A"], constrained(0, max_tokens=2, json_object=True), use_tqdm=False)
    row = ScheduledRequest._make([None] * len(ScheduledRequest._fields))._replace(
        req_id="probe", sampling_params=constrained(0, json_object=True), num_output_tokens=0)
    mask = engine.structured.bitmask([row], 2)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little").reshape(2, -1)
    vocab, tokenizer_size = engine.model_config.vocab_size, len(engine.tokenizer)
    assert tokenizer_size < vocab and bits[0, :vocab].any()
    assert not bits[0, tokenizer_size:].any() and bits[1].all()  # row 1: no grammar
    engine.structured.free("probe")


def test_a_grammar_that_ends_at_its_first_token_leaves_no_matcher_behind(llm):
    """A one-token choice ends its request at the step that applies its first token, when the
    next step (async scheduling) already holds its row: that row's mask must not bring the freed
    matcher back."""
    params = [constrained(s, choice=["a", "b", "c"]) for s in range(8)]
    outputs = llm.generate(["Hello"] * len(params), params, use_tqdm=False)
    assert all(o.outputs[0].text in ("a", "b", "c") for o in outputs)
    assert all(len(o.outputs[0].token_ids) == 1 for o in outputs)  # one token each: the case
    assert not llm.llm_engine.structured._rows  # every matcher freed
