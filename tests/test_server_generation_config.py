"""The model's generation_config.json defaults over HTTP (vLLM's rule): fields a request omits
take them, a request's own values win, --generation-config vllm turns them off."""

import json
import shutil

import httpx
import pytest

from jaxpaged.engine.generation_defaults import diff_sampling_param, generation_config_dir
from jaxpaged.server.generation_defaults import GenerationDefaults, generation_defaults
from jaxpaged.server.protocol import parse_chat_request, parse_completion_request
from server_testing import CLIENT_TIMEOUT_S, MODEL, MODEL_NAME, engine_config, start_server


@pytest.fixture(scope="module")
def http(tiny_checkpoint, tmp_path_factory):
    model = tmp_path_factory.mktemp("gen") / "model"
    shutil.copytree(tiny_checkpoint(MODEL), model)
    path = model / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "top_k": 1, "temperature": 0.8,
                                "max_new_tokens": 5}))
    server = start_server(engine_config(model))
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client
    server.stop()


def test_a_chat_request_without_limits_takes_the_models_defaults(http):
    """top_k 1 and max_new_tokens 5: five tokens, the same each time (issue 13's check)."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
            "ignore_eos": True, "return_token_ids": True}
    answers = [http.post("/v1/chat/completions", json=body).json() for _ in range(3)]
    assert all(a["usage"]["completion_tokens"] == 5 for a in answers)
    assert len({tuple(a["choices"][0]["token_ids"]) for a in answers}) == 1
    greedy = http.post("/v1/chat/completions", json={**body, "temperature": 0,
                                                     "max_tokens": 5}).json()
    assert greedy["choices"][0]["token_ids"] == answers[0]["choices"][0]["token_ids"]


def test_a_requests_own_values_win(http):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
            "ignore_eos": True, "max_tokens": 7}
    assert http.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 7
    completion = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi",
                                                    "ignore_eos": True}).json()
    assert completion["usage"]["completion_tokens"] == 16  # OpenAI's default for completions


MODEL_CONFIG = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 64,
                "eos_token_id": [1, 2], "do_sample": True}


def _server_defaults(mode, override, file_config):
    """What build_app composes: the engine's defaults (the one reader of the generation
    config), applied by the server, capping max_tokens when they come from a directory or the
    override."""
    engine = diff_sampling_param(mode, file_config, override or {})
    caps = mode not in ("auto", "vllm") or "max_new_tokens" in (override or {})
    return generation_defaults(engine, caps_max_tokens=caps)


def test_defaults_per_generation_config_mode(tmp_path):
    auto = _server_defaults("auto", None, MODEL_CONFIG)
    assert auto.sampling == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert auto.max_tokens == 64 and auto.max_tokens_cap is None
    assert _server_defaults("vllm", None, MODEL_CONFIG) == GenerationDefaults()
    (tmp_path / "generation_config.json").write_text(json.dumps({"min_p": 0.1,
                                                                 "max_new_tokens": 8}))
    directory = _server_defaults(str(tmp_path), {"repetition_penalty": 1.2},
                                 json.loads((tmp_path / "generation_config.json").read_text()))
    assert directory.sampling == {"min_p": 0.1, "repetition_penalty": 1.2}
    assert directory.resolve_max_tokens(100) == 8  # a directory's max_new_tokens caps
    override = _server_defaults("auto", {"max_new_tokens": 3}, MODEL_CONFIG)
    assert override.resolve_max_tokens(None) == 3 and override.resolve_max_tokens(10) == 3
    with pytest.raises(ValueError, match="must be 'auto', 'vllm' or a directory holding"):
        generation_config_dir(str(tmp_path / "nowhere"), tmp_path)


def test_parsing_applies_defaults_only_to_omitted_fields():
    defaults = _server_defaults("auto", None, MODEL_CONFIG)
    chat = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "top_k": 5},
                              defaults).common.params
    assert (chat.top_k, chat.temperature, chat.top_p, chat.max_tokens) == (5, 0.6, 0.9, 64)
    completion = parse_completion_request({"prompt": "x"}, defaults).common.params
    assert completion.max_tokens == 16 and completion.temperature == 0.6
