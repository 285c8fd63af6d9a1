"""The server on the built-in default model (SmolLM2-135M-Instruct): a chat question whose answer
shows that the model works, through the official `openai` client and a raw JSON request."""

import httpx
import openai
import pytest

from conftest import SMOLLM2_ENGINE_ARGS, SMOLLM2_NAME
from server_testing import CLIENT_TIMEOUT_S, engine_config, start_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    running = start_server(engine_config(smollm2_dir, **SMOLLM2_ENGINE_ARGS),
                           served_model_names=(SMOLLM2_NAME,))
    yield running
    running.stop()


def test_chat_answers_paris_at_temperature_0(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                       timeout=CLIENT_TIMEOUT_S) as client:
        assert [m.id for m in client.models.list().data] == [SMOLLM2_NAME]
        chat = client.chat.completions.create(model=SMOLLM2_NAME, messages=QUESTION,
                                              temperature=0, max_tokens=32)
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop"  # the model ends its turn itself


def test_the_readme_curl_request(server):
    body = {"model": SMOLLM2_NAME, "messages": QUESTION, "max_tokens": 32, "temperature": 0}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body,
                          timeout=CLIENT_TIMEOUT_S)
    assert response.status_code == 200
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
