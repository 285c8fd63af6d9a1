"""Structured outputs over HTTP through the official openai client: ``response_format`` (a
pydantic model via ``chat.completions.parse``, json_object), vLLM's ``structured_outputs`` and
the older ``guided_*`` fields, on both endpoints; the random-weight model must follow them."""

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server_testing import API_KEY, MODEL, MODEL_NAME, engine_config, start_server


class Pet(BaseModel):
    name: str = Field(min_length=1, max_length=5)
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=20)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = start_server(engine_config(tiny_checkpoint(MODEL), max_model_len=256),
                           api_keys=(API_KEY,))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                       timeout=60) as c:
        yield c


MESSAGES = [{"role": "user", "content": "Describe a pet."}]


def test_chat_parse_with_a_pydantic_model(client):
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=MODEL_NAME, messages=MESSAGES, response_format=Pet, seed=seed,
            temperature=1.0, max_completion_tokens=120)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Pet)


def test_streamed_json_schema_equals_the_whole_answer(client):
    # JSON allows any whitespace between tokens by default (vLLM's too), which a random model
    # may fill its budget with: compact JSON here
    extra = {"structured_outputs": {"json": Pet.model_json_schema(),
                                    "disable_any_whitespace": True}}
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, seed=7,
                                           extra_body=extra, max_tokens=120)
    assert whole.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, seed=7,
                                            extra_body=extra, max_tokens=120, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content
    jsonschema.validate(json.loads(text), Pet.model_json_schema())


def test_json_object_and_extra_fields_on_completions(client):
    out = client.completions.create(model=MODEL_NAME, prompt="A", max_tokens=40, seed=1,
                                    extra_body={"guided_regex": r"\d{3}-[xy]{2}"})
    assert re.fullmatch(r"\d{3}-[xy]{2}", out.choices[0].text)
    out = client.completions.create(model=MODEL_NAME, prompt="A", max_tokens=40, seed=2, n=3,
                                    extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert all(c.text in ("up", "down") for c in out.choices)
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=40,
                                         extra_body={"guided_choice": ["left", "right"]})
    assert out.choices[0].message.content in ("left", "right")
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=200, seed=3,
        response_format={"type": "json_object"},
        extra_body={"structured_outputs": None})
    choice = out.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")


def test_invalid_grammar_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.completions.create(model=MODEL_NAME, prompt="A", max_tokens=5,
                                  extra_body={"guided_regex": "[unclosed"})
