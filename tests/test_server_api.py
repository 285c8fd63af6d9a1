"""The OpenAI API of `jaxpaged serve`, through the official `openai` client, on the tiny model.

References: greedy text and logprobs against the Hugging Face goldens (tests/golden), streamed
against non-streamed answers, chat against completions of the same template tokens.
"""

import httpx
import numpy as np
import openai
import pytest

from conftest import GOLDEN_DIR
from jaxpaged.engine.tokenizer import load_tokenizer
from server_testing import API_KEY, MODEL, MODEL_NAME, engine_config, metric_value, start_server

@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = start_server(engine_config(tiny_checkpoint(MODEL)), api_keys=(API_KEY,))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                       timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint(MODEL))


@pytest.fixture(scope="module")
def golden():
    data = np.load(GOLDEN_DIR / f"{MODEL}.npz")
    count = sum(1 for k in data.files if k.startswith("prompt_ids_"))
    return [dict(prompt_ids=data[f"prompt_ids_{i}"].tolist(),
                 greedy_ids=data[f"greedy_ids_{i}"].tolist(),
                 last_logits=data[f"prompt_logits_{i}"][-1]) for i in range(count)]


GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the small engine."}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # open without a key


def test_greedy_completions_match_hf_goldens_in_one_batched_request(client, tokenizer, golden):
    prompts = [g["prompt_ids"] for g in golden]
    response = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=32,
                                         **GREEDY)
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert [c.index for c in response.choices] == list(range(len(golden)))
    for choice, g in zip(response.choices, golden):
        assert choice.text == tokenizer.decode(g["greedy_ids"], skip_special_tokens=True)
        assert choice.finish_reason == "length"
    prompt_tokens = sum(len(p) for p in prompts)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == 32 * len(golden)
    assert response.usage.total_tokens == prompt_tokens + 32 * len(golden)


def test_completion_logprobs_match_hf_logits(client, tokenizer, golden):
    g = golden[0]
    response = client.completions.create(model=MODEL_NAME, prompt=g["prompt_ids"], max_tokens=2,
                                         logprobs=3, **GREEDY)
    logprobs = response.choices[0].logprobs
    logits = g["last_logits"].astype(np.float64)
    expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = g["greedy_ids"][0]
    assert logprobs.tokens[0] == tokenizer.decode([first])
    assert logprobs.token_logprobs[0] == pytest.approx(expected[first], abs=1e-4)
    top3 = np.argsort(-expected)[:3]
    assert list(logprobs.top_logprobs[0]) == [tokenizer.decode([int(t)]) for t in top3]
    assert list(logprobs.top_logprobs[0].values()) == pytest.approx(expected[top3], abs=1e-4)
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 2
    assert logprobs.text_offset == [0, len(logprobs.tokens[0])]


def test_chat_logprobs_have_openai_shape(client):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4,
                                              logprobs=True, top_logprobs=2, **GREEDY)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 4
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy = argmax
        assert item.bytes == list(item.token.encode())


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0, n=1),
                                      dict(temperature=1.0, seed=1234, n=3)],
                         ids=["greedy", "seeded-n3"])
def test_streamed_text_equals_non_streamed(client, endpoint, sampling):
    args = dict(model=MODEL_NAME, max_tokens=24, **sampling)
    if endpoint == "completions":
        create, args["prompt"] = client.completions.create, "Once upon a time the engine"
    else:
        create, args["messages"] = client.chat.completions.create, MESSAGES
    whole = create(**args)
    texts, reasons, usage = {}, {}, None
    for event in create(**args, stream=True, stream_options={"include_usage": True}):
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            piece = choice.text if endpoint == "completions" else choice.delta.content
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    expected = {c.index: (c.text if endpoint == "completions" else c.message.content)
                for c in whole.choices}
    assert texts == expected
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage == whole.usage
    if sampling["n"] > 1:
        assert len(set(texts.values())) > 1, "seeded samples of one request should differ"


def test_stop_string_cuts_the_text_streamed_or_not(client):
    args = dict(model=MODEL_NAME, prompt="The small engine reads", max_tokens=30, **GREEDY)
    full = client.completions.create(**args).choices[0].text
    start = next(i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3])
    stop = full[start:start + 3]
    cut = client.completions.create(**args, stop=[stop, "never-appears"]).choices[0]
    assert (cut.text, cut.finish_reason) == (full[:full.find(stop)], "stop")
    streamed = "".join(e.choices[0].text for e in
                       client.completions.create(**args, stop=stop, stream=True))
    assert streamed == cut.text


def test_stop_token_ids_and_max_completion_tokens(client, golden):
    g = golden[1]
    stop_token = g["greedy_ids"][5]
    response = client.completions.create(
        model=MODEL_NAME, prompt=g["prompt_ids"], max_tokens=32, temperature=0.0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop_token]})
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == g["greedy_ids"].index(stop_token) + 1
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                          max_completion_tokens=3, **GREEDY)
    assert (chat.usage.completion_tokens, chat.choices[0].finish_reason) == (3, "length")


def test_chat_equals_completion_of_the_template_tokens(server, client):
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=16,
                                          **GREEDY)
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"messages": MESSAGES},
                        headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    completion = client.completions.create(model=MODEL_NAME, prompt=tokens, max_tokens=16,
                                           **GREEDY)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.prompt_tokens == len(tokens)


def test_every_sampling_knob_is_accepted(client):
    response = client.completions.create(
        model=MODEL_NAME, prompt="Keys and values", max_tokens=8, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.3, seed=7,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 8,
                    "ignore_eos": True})
    assert (response.usage.completion_tokens, response.choices[0].finish_reason) == (8, "length")


def test_tokenize_and_detokenize(server, tokenizer):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    text = "The small engine reads a prompt"
    body = httpx.post(f"{server.base_url}/tokenize", json={"prompt": text},
                      headers=headers).json()
    assert body["tokens"] == tokenizer.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 128
    back = httpx.post(f"{server.base_url}/detokenize", json={"tokens": body["tokens"]},
                      headers=headers).json()
    assert back == {"prompt": tokenizer.decode(body["tokens"])}


def test_metrics_move_after_a_request(server, client):
    def scrape():
        return httpx.get(f"{server.base_url}/metrics").text  # open without a key

    before = scrape()
    response = client.completions.create(model=MODEL_NAME, prompt="Blocks", max_tokens=5,
                                         **GREEDY)
    after = scrape()
    labels = dict(model_name=MODEL_NAME)
    for name, delta in [("vllm:request_success_total", 1),
                        ("vllm:generation_tokens_total", 5),
                        ("vllm:prompt_tokens_total", response.usage.prompt_tokens),
                        ("vllm:time_to_first_token_seconds_count", 1),
                        ("vllm:e2e_request_latency_seconds_count", 1),
                        ("vllm:inter_token_latency_seconds_count", 4)]:
        extra = {"finished_reason": "length"} if name == "vllm:request_success_total" else {}
        assert metric_value(after, name, **labels, **extra) - \
            metric_value(before, name, **labels, **extra) == delta, name
    assert metric_value(after, "vllm:num_requests_running", **labels) == 0
    assert metric_value(after, "vllm:kv_cache_usage_perc", **labels) == 0
    for name in ("vllm:num_requests_waiting", "vllm:num_preemptions_total",
                 "vllm:time_per_output_token_seconds_count", "jaxpaged:request_aborted_total"):
        assert f"{name}{{" in after, name


def test_api_key_is_required(server):
    url = f"{server.base_url}/v1/completions"
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_beam_search_completions_match_hf_beams(client, tokenizer):
    """use_beam_search with n beams as choices (vLLM's extra parameters): HF's beams, best first
    (tests/golden/beam_search.npz); a field the search would ignore is a 400 naming it."""
    beams = np.load(GOLDEN_DIR / "beam_search.npz")
    prompt = np.load(GOLDEN_DIR / f"{MODEL}.npz")["prompt_ids_1"].tolist()
    hf = beams["hf_ids_1_4"].tolist()
    response = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=len(hf[0]), n=4, temperature=0.0,
        extra_body={"use_beam_search": True, "ignore_eos": True, "length_penalty": 1.0,
                    "return_token_ids": True})
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.token_ids for c in response.choices] == hf
    assert [c.text for c in response.choices] == [tokenizer.decode(ids) for ids in hf]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 4 * len(hf[0])
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, n=2,
                                  top_p=0.5, extra_body={"use_beam_search": True})

