"""Tool calling through the official openai client: ``tool_choice`` "required" and a named
function are enforced by a grammar (the random-weight model must produce valid calls), "auto"
parses the output with vLLM's parsers (``--tool-call-parser``), streaming gives the same calls."""

import json

import jsonschema
import openai
import pytest

from jaxpaged.server.tool_calls import check_parser
from jaxpaged.server.tool_parsers import TOOL_PARSERS
from server_testing import API_KEY, MODEL, MODEL_NAME, engine_config, start_server

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 8},
                          "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    server = start_server(engine_config(tiny_checkpoint(MODEL), max_model_len=256),
                          api_keys=(API_KEY,), tool_call_parser="hermes")
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                       timeout=60) as c:
        yield c
    server.stop()


def _streamed_calls(stream):
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = call.id or entry["id"]
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


def _validate(calls):
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        assert call["id"].startswith("chatcmpl-tool-")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_required_tool_choice_gives_valid_calls(client, seed):
    args = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                seed=seed, max_tokens=150)
    whole = client.chat.completions.create(**args)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = [{"name": c.function.name, "arguments": c.function.arguments, "id": c.id}
             for c in choice.message.tool_calls]
    assert calls
    _validate(calls)
    streamed, finish = _streamed_calls(client.chat.completions.create(**args, stream=True))
    assert finish == "tool_calls"
    _validate(streamed)
    assert ([(c["name"], c["arguments"]) for c in streamed]
            == [(c["name"], c["arguments"]) for c in calls])


@pytest.mark.slow
def test_one_call_without_parallel_tool_calls(client):
    for seed in range(3):
        whole = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=seed,
            parallel_tool_calls=False, max_tokens=150)
        assert len(whole.choices[0].message.tool_calls) == 1


def test_named_function(client):
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, seed=4, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = whole.choices[0].message.tool_calls
    assert call.function.name == "get_time" and whole.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), TIME)


def test_auto_answers_text_when_the_model_calls_nothing(client):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS,
                                           max_tokens=5, temperature=0.0)
    choice = whole.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "length"


def test_bad_tool_choices_are_400(client):
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="needs 'tools'"):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                       tool_choice="required")


@pytest.mark.parametrize("parser,text,content,calls", [
    ("hermes", 'Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', "Sure.",
     [("f", {"a": 1})]),
    ("hermes", "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n"
               "<tool_call>{\"name\": \"g\", \"arguments\": {\"b\": [2]}}</tool_call>", None,
     [("f", {}), ("g", {"b": [2]})]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"a": "x"}}', None,
     [("f", {"a": "x"})]),
    ("llama3_json", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"c": 3}}',
     None, [("f", {}), ("g", {"c": 3})]),
    ("mistral", 'ok [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', "ok",
     [("f", {"a": 1})]),
    ("mistral", "no calls here", "no calls here", []),
    ("hermes", "<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
])
def test_parsers(parser, text, content, calls):
    assert TOOL_PARSERS[parser](text) == (content, calls)


def test_auto_tool_choice_flags():
    assert check_parser(True, "hermes") == "hermes"
    assert check_parser(False, "hermes") is None
    with pytest.raises(ValueError, match="--tool-call-parser"):
        check_parser(True, None)
