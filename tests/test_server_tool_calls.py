"""Tool calling through the official openai client: ``tool_choice`` "required" and a named
function are enforced by a grammar (the random-weight model must produce valid calls), "auto"
parses the output with vLLM's parsers (``--tool-call-parser``). Streams send each call's name
first, then its arguments in pieces as they are generated; the client's stream helper assembles
the same calls as the whole answer."""

import json

import jsonschema
import openai
import pytest

from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from jaxpaged.server.tool_calls import ToolCalling, check_parser
from jaxpaged.server.tool_parsers import TOOL_PARSERS
from jaxpaged.server.tool_stream import ToolCallStream
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


def _calls_of(message):
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def _check_deltas(stream):
    """Each call's first delta names it (index, id, type, name); later ones carry arguments
    only. Returns the number of argument pieces of each call."""
    pieces = {}
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.index not in pieces:
                    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
                    assert call.function.name
                    pieces[call.index] = 0
                else:
                    assert call.id is None and call.function.name is None
                pieces[call.index] += bool(call.function.arguments)
    return [pieces[i] for i in sorted(pieces)]


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
    assert all(n > 1 for n in _check_deltas(client.chat.completions.create(**args, stream=True)))
    with client.chat.completions.stream(**args) as helper:
        final = helper.get_final_completion()
    assert _calls_of(final.choices[0].message) == _calls_of(choice.message)
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.slow
def test_one_call_without_parallel_tool_calls(client):
    for seed in range(3):
        whole = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=seed,
            parallel_tool_calls=False, max_tokens=150)
        assert len(whole.choices[0].message.tool_calls) == 1


def test_named_function(client):
    args = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, seed=4, max_tokens=100,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**args)
    [call] = whole.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and whole.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    [pieces] = _check_deltas(client.chat.completions.create(**args, stream=True))
    assert pieces > 1
    with client.chat.completions.stream(**args) as helper:
        final = helper.get_final_completion()
    assert _calls_of(final.choices[0].message) == _calls_of(whole.choices[0].message)


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


PARSED = [
    ("hermes", 'Sure.<tool_call>{"name": "f", "arguments": {"a": [1, "x}"]}}</tool_call>',
     "Sure.", [("f", '{"a": [1, "x}"]}')]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n'
               '<tool_call>{"arguments": {"b": [2]}, "name": "g"}</tool_call>', None,
     [("f", "{}"), ("g", '{"b": [2]}')]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"a": "x"}}', None,
     [("f", '{"a": "x"}')]),
    ("llama3_json", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"c": 3}}',
     None, [("f", "{}"), ("g", '{"c": 3}')]),
    ("mistral", 'ok [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, '
                '{"name": "g", "arguments": "{\\"z\\": 1}"}]', "ok ",
     [("f", '{"a": 1}'), ("g", '{"z": 1}')]),
    ("mistral", "no calls here", "no calls here", []),
    ("hermes", "<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
    ("llama3_json", "{\"answer\": 42}", "{\"answer\": 42}", []),
    ("llama3_json", "<b>text</b>", "<b>text</b>", []),
]


CUT = 'cut <tool_call>{"name": "f", "arguments": {"a"'


@pytest.mark.parametrize("parser,text,content,calls",
                         PARSED + [("hermes", CUT, CUT, [])])  # cut short: no calls, content
def test_parsers(parser, text, content, calls):
    scan = TOOL_PARSERS[parser](text, True)
    assert (scan.content, [(c.name, c.arguments) for c in scan.calls]) == (content, calls)


def _stream_chunks(tools: ToolCalling, text: str, step: int):
    """The chat chunks a stream sends for ``text`` arriving ``step`` characters at a time."""
    stream, chunks = ToolCallStream(tools), []
    for end in range(step, len(text) + step, step):
        finished = end >= len(text)
        delta = stream.delta(text[:end], finished)
        chunks.append({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0,
                       "model": "m", "choices": [{
                           "index": 0, "delta": {"role": "assistant", **delta},
                           "finish_reason": stream.finish_reason("stop") if finished else None}]})
    return chunks


@pytest.mark.parametrize("parser,text,content,calls", PARSED)
@pytest.mark.parametrize("step", [1, 4])
def test_streamed_calls_are_the_whole_answers(parser, text, content, calls, step):
    """Streamed a few characters at a time, the client's stream helper assembles the content and
    calls of the whole answer; arguments come in pieces once the name is known."""
    tools = ToolCalling("auto", TOOLS, parser=parser)
    chunks = _stream_chunks(tools, text, step)
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    message = state.get_final_completion().choices[0].message
    assert (message.content or None, _calls_of(message)) == (content, calls)
    whole_content, whole_calls = tools.extract(text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole_calls] == calls
    assert whole_content == content
    if step == 1 and any(len(arguments) > 4 for _, arguments in calls):
        pieces = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
        assert len(pieces) > len(calls)


def test_a_call_cut_short_stays_as_far_as_it_was_streamed():
    state = ChatCompletionStreamState()
    for chunk in _stream_chunks(ToolCalling("auto", TOOLS, parser="hermes"), CUT, 1):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    message = state.get_final_completion().choices[0].message
    assert (message.content, _calls_of(message)) == ("cut ", [("f", '{"a"')])


@pytest.mark.parametrize("mode,text,calls", [
    ("required", '[{"name":"get_time","parameters":{"zone":"UTC"}},'
                 '{"name":"get_weather","parameters":{"city":"Nice","unit":"C"}}]',
     [("get_time", '{"zone":"UTC"}'), ("get_weather", '{"city":"Nice","unit":"C"}')]),
    ("named", '{"zone":"CET"}', [("get_time", '{"zone":"CET"}')]),
])
def test_grammar_choices_stream_their_calls(mode, text, calls):
    tools = ToolCalling(mode, TOOLS, name="get_time" if mode == "named" else None)
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for chunk in _stream_chunks(tools, text, 1):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion().choices[0]
    assert _calls_of(final.message) == calls and final.finish_reason == "tool_calls"


def test_auto_tool_choice_flags():
    assert check_parser(True, "hermes") == "hermes"
    assert check_parser(False, "hermes") is None
    with pytest.raises(ValueError, match="--tool-call-parser"):
        check_parser(True, None)
