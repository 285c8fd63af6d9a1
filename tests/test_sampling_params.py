"""SamplingParams: vLLM's defaults, normalisation and ValueError checks; the output dataclasses."""

import dataclasses

import pytest

from jaxpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpaged.sampling_params import SamplingParams, SamplingType

VLLM_DEFAULTS = dict(
    n=1,
    best_of=None,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    repetition_penalty=1.0,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    seed=None,
    stop=[],
    stop_token_ids=[],
    ignore_eos=False,
    max_tokens=16,
    min_tokens=0,
    logprobs=None,
    prompt_logprobs=None,
    detokenize=True,
    skip_special_tokens=True,
    spaces_between_special_tokens=True,
    include_stop_str_in_output=False,
)


def test_defaults_match_vllm():
    params = SamplingParams()
    for name, value in VLLM_DEFAULTS.items():
        assert getattr(params, name) == value, name
    assert params.sampling_type == SamplingType.RANDOM and not params.is_greedy


def test_every_public_field_has_an_attribute_docstring():
    import inspect

    import jaxpaged.sampling_params as module

    source = inspect.getsource(module.SamplingParams)
    for field in dataclasses.fields(SamplingParams):
        if field.name.startswith("_"):
            continue
        head = source.split(f"    {field.name}: ", 1)[1]
        assert head.splitlines()[1].strip().startswith('"""'), field.name


def test_keyword_arguments_in_vllm_order_are_accepted():
    params = SamplingParams(
        n=2, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, seed=3, max_tokens=None
    )
    assert (params.n, params.top_k, params.max_tokens) == (2, 50, None)
    assert params.sampling_type == SamplingType.RANDOM_SEED


@pytest.mark.parametrize(
    "stop, expected",
    [(None, []), ("###", ["###"]), (["a", "b"], ["a", "b"]), (("x",), ["x"])],
)
def test_stop_is_normalised_to_a_list(stop, expected):
    assert SamplingParams(stop=stop).stop == expected


def test_stop_token_ids_are_normalised_to_a_list():
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]
    assert SamplingParams(stop_token_ids=[7]).all_stop_token_ids == {7}


def test_top_k_minus_one_means_disabled():
    assert SamplingParams(top_k=-1).top_k == 0


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-6])
def test_greedy_switches_filters_off(temperature):
    params = SamplingParams(temperature=temperature, top_p=0.5, top_k=5, min_p=0.3, seed=1)
    assert params.is_greedy and params.sampling_type == SamplingType.GREEDY
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)


def test_greedy_allows_n_above_one():
    assert SamplingParams(temperature=0.0, n=3).n == 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", "hot"),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("n", 0),
        ("n", 1.0),
        ("best_of", 2),
        ("best_of", 1),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.0),
        ("min_tokens", -1),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("logprobs", -2),
        ("prompt_logprobs", -2),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop", [""]),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 7),
        ("seed", 1.5),
        ("seed", "42"),
        ("seed", True),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=17, max_tokens=16)
    assert SamplingParams(min_tokens=100, max_tokens=None).min_tokens == 100


@pytest.mark.parametrize(
    "field, value",
    [("presence_penalty", 2.0), ("frequency_penalty", -2.0), ("top_p", 1.0), ("min_p", 1.0)],
)
def test_bounds_are_inclusive_where_vllm_says_so(field, value):
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_generation_config_eos_ids_become_stop_tokens():
    params = SamplingParams(stop_token_ids=[9])
    params.update_from_generation_config({"eos_token_id": [128001, 128009]}, 128001)
    assert params.stop_token_ids == [9, 128009]
    assert params.all_stop_token_ids == {9, 128001, 128009}

    ignoring = SamplingParams(ignore_eos=True)
    ignoring.update_from_generation_config({"eos_token_id": 5}, 4)
    assert ignoring.stop_token_ids == [] and ignoring.all_stop_token_ids == {4, 5}


def test_output_text_buffer_length():
    assert SamplingParams().output_text_buffer_length == 0
    assert SamplingParams(stop=["ab", "cdef"]).output_text_buffer_length == 3
    kept = SamplingParams(stop=["ab"], include_stop_str_in_output=True)
    assert kept.output_text_buffer_length == 0


def test_clone_is_independent():
    params = SamplingParams(stop=["x"], stop_token_ids=[3])
    params.update_from_generation_config({"eos_token_id": 8})
    clone = params.clone()
    clone.stop.append("y")
    clone.stop_token_ids.append(4)
    assert params.stop == ["x"] and params.stop_token_ids == [3, 8]
    assert clone.all_stop_token_ids == {3, 8}


def test_output_dataclasses_have_vllm_fields():
    completion = CompletionOutput(
        index=0,
        text="hi",
        token_ids=[5, 6],
        cumulative_logprob=-1.5,
        logprobs=[{5: Logprob(-1.0, rank=1)}, {6: Logprob(-0.5)}],
        finish_reason="stop",
        stop_reason=6,
    )
    output = RequestOutput(
        request_id="0",
        prompt="Hello",
        prompt_token_ids=[1, 2],
        prompt_logprobs=None,
        outputs=[completion],
        finished=True,
    )
    assert output.metrics is None and output.outputs[0].finished()
    assert not CompletionOutput(0, "", [], None, None).finished()
