"""Every request field of OpenAI and vLLM, walked from the inventory (server/request_fields.py):
honoured fields are accepted, no-op fields accepted, refused fields answered 400 "not supported
by jaxpaged" naming the field (on main before the inventory they all returned 200 and did
nothing), unknown fields 400 naming them.

Effects of the honoured fields are in test_server_vllm_fields.py."""

import httpx
import pytest

from jaxpaged.server.request_fields import (CHAT_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS,
                                            Treatment)
from server_testing import CLIENT_TIMEOUT_S, MODEL, MODEL_NAME, engine_config, start_server



@pytest.fixture(scope="module")
def http(tiny_checkpoint):
    server = start_server(engine_config(tiny_checkpoint(MODEL), scheduling_policy="priority"),
                          trust_request_chat_template=True)
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client
    server.stop()


ENDPOINTS = {"completions": ("/v1/completions", COMPLETION_FIELDS),
             "chat": ("/v1/chat/completions", CHAT_FIELDS)}
BASE = {"completions": {"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 3},
        "chat": {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
                 "max_tokens": 3}}
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

# Fields a valid request may carry besides BASE, per honoured field (on both endpoints unless
# the endpoint's own entry says otherwise).
HONOURED = {
    "model": {"model": MODEL_NAME}, "n": {"n": 2}, "temperature": {"temperature": 0.5},
    "use_beam_search": {"use_beam_search": True, "n": 2},  # /v1/completions only
    "length_penalty": {"use_beam_search": True, "length_penalty": 0.5},
    "top_p": {"top_p": 0.9}, "top_k": {"top_k": 3}, "min_p": {"min_p": 0.1},
    "presence_penalty": {"presence_penalty": 0.5}, "frequency_penalty": {"frequency_penalty": 0.5},
    "repetition_penalty": {"repetition_penalty": 1.1}, "seed": {"seed": 3}, "stop": {"stop": "x"},
    "stop_token_ids": {"stop_token_ids": [5]}, "ignore_eos": {"ignore_eos": True},
    "min_tokens": {"min_tokens": 1}, "max_tokens": {"max_tokens": 2},
    "skip_special_tokens": {"skip_special_tokens": False},
    "spaces_between_special_tokens": {"spaces_between_special_tokens": False},
    "include_stop_str_in_output": {"include_stop_str_in_output": True},
    "stream": {"stream": False},
    "stream_options": {"stream": True, "stream_options": {"include_usage": True}},
    "logit_bias": {"logit_bias": {"5": 1.5}}, "allowed_token_ids": {"allowed_token_ids": [5, 6]},
    "bad_words": {"bad_words": ["engine"]}, "truncate_prompt_tokens": {"truncate_prompt_tokens": 2},
    "truncation_side": {"truncation_side": "right"}, "prompt_logprobs": {"prompt_logprobs": 1},
    "add_special_tokens": {"add_special_tokens": False}, "echo": {"echo": True},
    "priority": {"priority": 3}, "request_id": {"request_id": "walk-1"},
    "return_token_ids": {"return_token_ids": True},
    "return_tokens_as_token_ids": {"return_tokens_as_token_ids": True},
    "cache_salt": {"cache_salt": "salty"},
    "tool_choice": {"tools": [TOOL], "tool_choice": "required"},
    "parallel_tool_calls": {"tools": [TOOL], "tool_choice": "required",
                            "parallel_tool_calls": False},
    "response_format": {"response_format": {"type": "json_object"}},
    "structured_outputs": {"structured_outputs": {"choice": ["yes", "no"]}},
    "guided_json": {"guided_json": {"type": "object"}}, "guided_regex": {"guided_regex": "[a-z]+"},
    "guided_choice": {"guided_choice": ["yes", "no"]},
    "guided_grammar": {"guided_grammar": 'root ::= "a"'},
    "guided_decoding_backend": {"guided_decoding_backend": "guidance", "guided_regex": "a+"},
    "guided_whitespace_pattern": {"guided_json": {"type": "object"},
                                  "guided_whitespace_pattern": " "},
    "prompt": {"prompt": [5, 6, 7]}, "logprobs": {"logprobs": 2},
    "messages": {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi"}]},
    "top_logprobs": {"logprobs": True, "top_logprobs": 2},
    "max_completion_tokens": {"max_completion_tokens": 2},
    "add_generation_prompt": {"add_generation_prompt": False},
    "continue_final_message": {"add_generation_prompt": False, "continue_final_message": True},
    "chat_template": {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
    "chat_template_kwargs": {"chat_template_kwargs": {"enable_thinking": False}},
    "tools": {"tools": [TOOL], "tool_choice": "none"},
    "return_prompt_text": {"return_prompt_text": True},
}
CHAT_ONLY_LOGPROBS = {"logprobs": {"logprobs": True}}

NO_OP = {"user": "u-1", "session_id": "s-1", "routed_experts_prompt_start": 0,
         "return_token_offsets": True, "return_mm_kwargs": False, "include_reasoning": False,
         "metadata": {"k": "v"}, "prompt_cache_key": "p",
         "safety_identifier": "x"}

# A value asking for something jaxpaged does not do, per refused field.
ASKING = {
    "best_of": 3, "use_beam_search": True, "length_penalty": 0.5, "early_stopping": True,
    "watermarking": True, "logprob_token_ids": [5], "logits_processors": ["my.Processor"],
    "repetition_detection": {"max_pattern_size": 4}, "thinking_token_budget": 10,
    "stream_interval": 4, "kv_transfer_params": {"do_remote_decode": True},
    "ec_transfer_params": {"x": 1}, "vllm_xargs": {"x": 1}, "suffix": "!",
    "prompt_embeds": "AAAA", "functions": [TOOL["function"]],
    "function_call": "auto", "documents": [{"title": "t", "text": "x"}],
    "reasoning_effort": "low", "verbosity": "high", "audio": {"voice": "alloy"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "store": True, "service_tier": "flex",
    "media_io_kwargs": {"video": {"num_frames": 4}}, "mm_processor_kwargs": {"size": 3},
}
# Values of refused fields that ask for nothing: accepted.
HARMLESS = {"best_of": 1, "use_beam_search": False, "length_penalty": 1.0,
            "early_stopping": False, "watermarking": False,
            "thinking_token_budget": -1, "stream_interval": 1, "suffix": "",
            "function_call": "none", "verbosity": "medium",
            "modalities": ["text"], "store": False, "service_tier": "auto",
            "media_io_kwargs": {}, "mm_processor_kwargs": {}}


def _names(table, treatment):
    return sorted(name for name, spec in table.items() if spec.treatment is treatment)


def _cases(treatment):
    return [pytest.param(endpoint, name, id=f"{endpoint}-{name}")
            for endpoint, (_, table) in ENDPOINTS.items() for name in _names(table, treatment)]


def test_the_walk_covers_the_whole_inventory():
    for _, table in ENDPOINTS.values():
        assert set(_names(table, Treatment.HONOURED)) <= set(HONOURED)
        assert set(_names(table, Treatment.NO_OP)) <= set(NO_OP)
        assert set(_names(table, Treatment.REFUSED)) <= set(ASKING)
        harmless = {n for n in _names(table, Treatment.REFUSED)
                    if table[n].harmless(HARMLESS.get(n, object()), {})}
        assert harmless == set(HARMLESS) & set(_names(table, Treatment.REFUSED))
    # every OpenAI chat field a current client sends is listed
    for name in ("audio", "frequency_penalty", "function_call", "functions", "logit_bias",
                 "logprobs", "max_completion_tokens", "metadata", "modalities", "n",
                 "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
                 "reasoning_effort", "response_format", "safety_identifier", "seed",
                 "service_tier", "stop", "store", "stream_options", "temperature",
                 "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
                 "web_search_options"):
        assert name in CHAT_FIELDS, name


def _post(http, endpoint, fields):
    path, _ = ENDPOINTS[endpoint]
    return http.post(path, json={**BASE[endpoint], **fields})


@pytest.mark.parametrize("endpoint,name", _cases(Treatment.HONOURED))
def test_honoured_fields_are_accepted(http, endpoint, name):
    fields = (CHAT_ONLY_LOGPROBS if endpoint == "chat" else {}).get(name, HONOURED[name])
    response = _post(http, endpoint, fields)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("endpoint,name", _cases(Treatment.NO_OP))
def test_no_op_fields_are_accepted(http, endpoint, name):
    response = _post(http, endpoint, {name: NO_OP[name]})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("endpoint,name", _cases(Treatment.REFUSED))
def test_refused_fields_get_400_naming_the_field(http, endpoint, name):
    fields = {name: ASKING[name]}
    response = _post(http, endpoint, fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and error["code"] == "unsupported_field", error
    assert "not supported by jaxpaged" in error["message"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_refused_fields_at_values_that_ask_for_nothing_are_accepted(http, endpoint):
    table = ENDPOINTS[endpoint][1]
    response = _post(http, endpoint, {k: v for k, v in HARMLESS.items() if k in table})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unknown_fields_get_400_naming_them(http, endpoint):
    response = _post(http, endpoint, {"temprature": 0.5})  # a typo is not silently ignored
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "temprature" and error["code"] == "unknown_field"


def test_tools_without_tool_choice_none_are_refused(http):
    response = _post(http, "chat", {"tools": [TOOL]})  # OpenAI's default: tool_choice "auto"
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools"


@pytest.mark.parametrize("field,value", [("audio", {"id": "a"}), ("function_call", {"name": "f"}),
                                         ("colour", "red")])
def test_message_fields_that_are_refused_or_unknown(http, field, value):
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "", field: value}]
    response = _post(http, "chat", {"messages": messages})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == f"messages[1].{field}"


def test_message_inventory_is_complete():
    openai_keys = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio",
                   "function_call", "annotations"}
    assert openai_keys <= set(MESSAGE_FIELDS)
