"""generation_config.json sampling defaults, applied as vLLM does: to requests given no
SamplingParams (``generation_config="auto"|"vllm"|DIR``, ``override_generation_config``)."""

from __future__ import annotations

import json
import shutil

import pytest

from jaxpaged import SamplingParams
from jaxpaged.engine.generation_defaults import diff_sampling_param
from llm_testing import MODEL, make_llm, random_prompts, token_ids

PROMPT = random_prompts(1, seed=41, low=12, high=12)[0]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model with ``top_k: 1, max_new_tokens: 5`` added to its generation_config.json."""
    path = tmp_path_factory.mktemp("gen-config") / "model"
    shutil.copytree(tiny_checkpoint(MODEL), path)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(top_k=1, max_new_tokens=5, do_sample=True)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def llm_on(checkpoint, **overrides):
    """``make_llm``'s engine settings on this module's checkpoint."""
    return make_llm(lambda _name: checkpoint, **overrides)


def test_diff_sampling_param_follows_vllm():
    file = {"temperature": 0.6, "top_p": 0.9, "top_k": None, "max_new_tokens": 7,
            "do_sample": True, "eos_token_id": [1, 2]}
    assert diff_sampling_param("auto", file, {}) == {"temperature": 0.6, "top_p": 0.9,
                                                     "max_tokens": 7}
    assert diff_sampling_param("auto", file, {"temperature": 0.1, "min_p": 0.2}) == {
        "temperature": 0.1, "top_p": 0.9, "min_p": 0.2, "max_tokens": 7}
    assert diff_sampling_param("vllm", file, {}) == {}
    assert diff_sampling_param("vllm", file, {"repetition_penalty": 1.1}) == {
        "repetition_penalty": 1.1}
    with pytest.raises(ValueError, match="override_generation_config"):
        diff_sampling_param("auto", file, {"do_sample": True})


def test_greedy_defaults_give_five_tokens_the_same_each_time(checkpoint, tiny_checkpoint):
    llm = llm_on(checkpoint)
    assert llm.llm_engine.get_diff_sampling_param() == {"top_k": 1, "max_tokens": 5}
    defaults = llm.get_default_sampling_params()
    assert (defaults.top_k, defaults.max_tokens, defaults.temperature) == (1, 5, 1.0)
    runs = [token_ids(llm.generate(PROMPT, use_tqdm=False))[0] for _ in range(3)]
    reference = make_llm(tiny_checkpoint).generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    assert runs == [token_ids(reference)[0]] * 3 and len(runs[0]) == 5
    chat = llm.chat([{"role": "user", "content": "Hi"}], use_tqdm=False)[0]
    assert len(chat.outputs[0].token_ids) <= 5


def test_explicit_sampling_params_are_not_overridden(checkpoint):
    llm = llm_on(checkpoint)
    explicit = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    assert len(token_ids(llm.generate(PROMPT, explicit, use_tqdm=False))[0]) == 9


@pytest.mark.parametrize("kwargs, expected", [
    (dict(generation_config="vllm"), {}),
    (dict(override_generation_config={"max_new_tokens": 2}), {"top_k": 1, "max_tokens": 2}),
    (dict(generation_config="vllm", override_generation_config={"temperature": 0.0}),
     {"temperature": 0.0}),
])
def test_generation_config_modes_and_overrides(checkpoint, kwargs, expected):
    llm = llm_on(checkpoint, **kwargs)
    assert llm.llm_engine.get_diff_sampling_param() == expected
    assert llm.get_default_sampling_params().max_tokens == expected.get("max_tokens", 16)


def test_generation_config_directory(checkpoint, tiny_checkpoint, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3,
                                                                 "eos_token_id": 2}))
    llm = make_llm(tiny_checkpoint, generation_config=str(tmp_path))
    assert llm.llm_engine.get_diff_sampling_param() == {"max_tokens": 3}
    assert len(token_ids(llm.generate(PROMPT, use_tqdm=False))[0]) <= 3


@pytest.mark.parametrize("kwargs, field", [
    (dict(generation_config="/no/such/dir"), "generation_config"),
    (dict(override_generation_config={"top_p": 0.0}), "top_p"),
    (dict(override_generation_config={"seed": 1}), "override_generation_config"),
    (dict(override_generation_config='{"top_k": 1}'), "override_generation_config"),
])
def test_bad_generation_config_settings_are_refused(checkpoint, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm_on(checkpoint, **kwargs)
