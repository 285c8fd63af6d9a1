"""Serving a model with no tokenizer (config.json only, dummy weights, as the benchmarks do):
prompts are token ids, and streaming still sends one chunk per generated token, although each
chunk's text is empty (vLLM's rule: new token ids make a chunk)."""

import shutil

import openai
import pytest

from server_testing import MODEL, MODEL_NAME, engine_config, start_server


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("config-only")
    shutil.copy(tiny_checkpoint(MODEL) / "config.json", model_dir / "config.json")
    running = start_server(engine_config(model_dir, load_format="dummy"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


def test_the_engine_really_has_no_tokenizer(server):
    assert server.engine.tokenizer is None


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_streaming_sends_a_chunk_per_token_without_a_tokenizer(client, max_tokens):
    stream = client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7, 8, 9],
                                       max_tokens=max_tokens, temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = [c for c in stream if c.choices]
    assert all(c.choices[0].text == "" for c in chunks)
    # one chunk per token; the last one also carries the finish reason
    assert len(chunks) == max_tokens
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (max_tokens - 1) + ["length"]


def test_non_streamed_usage_counts_the_tokens(client):
    out = client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7, 8, 9], max_tokens=4,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4 and out.choices[0].text == ""
