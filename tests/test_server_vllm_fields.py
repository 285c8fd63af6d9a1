"""vLLM's request fields honoured over HTTP, through the official `openai` client and raw HTTP,
on the tiny model: echo with prompt logprobs (lm-eval's loglikelihood), prompt_logprobs,
return_token_ids, return_tokens_as_token_ids, stop_reason, add_special_tokens, request chat
templates and their kwargs, tool messages, request ids, priority, cache_salt, several API keys,
GET /v1/models/{id}, and the sampler's fields. On main before this change every one of these was
accepted and did nothing (or was refused)."""

import json

import httpx
import numpy as np
import openai
import pytest

from conftest import GOLDEN_DIR
from jaxpaged.engine.tokenizer import load_tokenizer
from server_testing import (CLIENT_TIMEOUT_S, MODEL, MODEL_NAME, engine_config, metric_value,
                            start_server)

KEYS = ("sk-first", "sk-second")
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = start_server(engine_config(tiny_checkpoint(MODEL), scheduling_policy="priority"),
                           api_keys=KEYS, trust_request_chat_template=True)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEYS[0], max_retries=0,
                       timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S,
                      headers={"authorization": f"Bearer {KEYS[1]}"}) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint(MODEL))


@pytest.fixture(scope="module")
def golden():
    data = np.load(GOLDEN_DIR / f"{MODEL}.npz")
    return dict(prompt_ids=data["prompt_ids_0"].tolist(), logits=data["prompt_logits_0"],
                greedy_ids=data["greedy_ids_0"].tolist())


def _log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _expected_prompt_logprobs(golden):
    """HF's logprob of prompt token j given tokens < j (None for the first)."""
    ids = golden["prompt_ids"]
    return [None] + [_log_softmax(golden["logits"][j - 1])[ids[j]] for j in range(1, len(ids))]


def _completion(http, **fields):
    body = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0, "ignore_eos": True, **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def _chat(http, **fields):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, "temperature": 0, "ignore_eos": True, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# ----- echo and prompt logprobs -----

def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt(client, tokenizer, golden):
    """lm-eval-harness' loglikelihood request: the prompt's own logprobs, nothing generated."""
    ids = golden["prompt_ids"]
    response = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=0, echo=True,
                                         logprobs=1, temperature=0)
    choice = response.choices[0]
    assert choice.text == tokenizer.decode(ids)
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    expected = _expected_prompt_logprobs(golden)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == len(ids)


def test_echo_puts_the_prompt_first_streamed_or_not(client):
    kwargs = dict(model=MODEL_NAME, prompt="The small engine", max_tokens=5, echo=True,
                  logprobs=2, **GREEDY)
    whole = client.completions.create(**kwargs).choices[0]
    assert whole.text.startswith("The small engine")
    prompt_tokens = client.completions.create(**{**kwargs, "max_tokens": 1}).usage.prompt_tokens
    assert len(whole.logprobs.tokens) == prompt_tokens + 5
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs


def test_prompt_logprobs_match_hugging_face(http, golden):
    choice = _completion(http, prompt=golden["prompt_ids"], prompt_logprobs=2).json()["choices"][0]
    entries = choice["prompt_logprobs"]
    ids = golden["prompt_ids"]
    assert len(entries) == len(ids) and entries[0] is None
    for j, (entry, expected) in enumerate(zip(entries[1:], _expected_prompt_logprobs(golden)[1:])):
        assert entry[str(ids[j + 1])]["logprob"] == pytest.approx(expected, abs=1e-4)
        assert len(entry) <= 3  # the token itself and the top 2
        assert {e["rank"] for t, e in entry.items() if t != str(ids[j + 1])} <= {1, 2}


def test_prompt_logprobs_while_streaming_are_refused(http):
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi",
                                                  "stream": True, "prompt_logprobs": 1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt_logprobs"


def test_chat_prompt_logprobs_are_at_the_top_level(http):
    body = _chat(http, prompt_logprobs=1, return_token_ids=True)
    assert len(body["prompt_logprobs"]) == len(body["prompt_token_ids"])
    assert body["prompt_logprobs"][0] is None and all(body["prompt_logprobs"][1:])


# ----- token ids, stop reasons, special tokens -----

def test_return_token_ids_streamed_or_not(http, tokenizer):
    whole = _completion(http, prompt="Blocks and tokens", return_token_ids=True).json()
    choice = whole["choices"][0]
    assert choice["prompt_token_ids"] == tokenizer.encode("Blocks and tokens")
    assert len(choice["token_ids"]) == whole["usage"]["completion_tokens"] == 4
    assert tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    with http.stream("POST", "/v1/completions", json={
            "model": MODEL_NAME, "prompt": "Blocks and tokens", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert all("prompt_token_ids" not in c["choices"][0] for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == choice["token_ids"]


def test_chat_return_token_ids_and_prompt_text(http):
    body = _chat(http, return_token_ids=True, return_prompt_text=True)
    tokenized = http.post("/tokenize", json={"model": MODEL_NAME, "messages": [
        {"role": "user", "content": "Hi"}]}).json()
    assert body["prompt_token_ids"] == tokenized["tokens"]
    assert "<|start_header_id|>user<|end_header_id|>" in body["prompt_text"]
    assert len(body["choices"][0]["token_ids"]) == body["usage"]["completion_tokens"]


def test_return_tokens_as_token_ids(http):
    choice = _completion(http, prompt="Hi", logprobs=1, return_token_ids=True,
                         return_tokens_as_token_ids=True).json()["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(k.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"]
               for k in top)


def test_stop_reason_names_the_stop_string_or_token(client, golden):
    ids, greedy = golden["prompt_ids"], golden["greedy_ids"]
    by_token = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10,
                                         temperature=0, extra_body={"stop_token_ids": [greedy[2]]})
    assert by_token.choices[0].finish_reason == "stop"
    assert by_token.choices[0].model_extra["stop_reason"] == greedy[2]
    text = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8,
                                     **GREEDY).choices[0].text
    stop = text[3:5]
    by_string = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, stop=[stop],
                                          **GREEDY).choices[0]
    assert by_string.finish_reason == "stop" and by_string.model_extra["stop_reason"] == stop
    length = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=2, **GREEDY)
    assert length.choices[0].model_extra["stop_reason"] is None
    streamed = list(client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        stream=True, **GREEDY))
    assert streamed[-1].choices[0].finish_reason == "length"
    assert "stop_reason" in streamed[-1].choices[0].model_extra


def test_add_special_tokens(http, tokenizer):
    with_bos = _completion(http, prompt="Hello", return_token_ids=True).json()["choices"][0]
    without = _completion(http, prompt="Hello", add_special_tokens=False,
                          return_token_ids=True).json()["choices"][0]
    assert with_bos["prompt_token_ids"] == [tokenizer.bos_token_id] + without["prompt_token_ids"]
    chat_default = _chat(http, return_token_ids=True)["prompt_token_ids"]
    chat_added = _chat(http, return_token_ids=True, add_special_tokens=True)["prompt_token_ids"]
    assert chat_added == [tokenizer.bos_token_id] + chat_default  # on top of the template's BOS


# ----- chat templates and tool messages -----

TOOL_TEMPLATE = (
    "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
    "{% for m in messages %}<{{ m.role }}"
    "{% if m.name %} name={{ m.name }}{% endif %}"
    "{% if m.tool_call_id %} id={{ m.tool_call_id }}{% endif %}>"
    "{% for c in m.tool_calls or [] %}call {{ c.function.name }}({{ c.function.arguments.city }})"
    "{% endfor %}{{ m.content }}{% endfor %}{{ greeting }}")


def test_request_chat_template_and_kwargs(http):
    body = _chat(http, chat_template="{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                                     "{% endfor %}{{ suffix_text }}",
                 chat_template_kwargs={"suffix_text": "!!"}, return_prompt_text=True)
    assert body["prompt_text"] == "[user]Hi!!"


def test_tool_messages_reach_the_chat_template(http):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    body = _chat(http, messages=messages, chat_template=TOOL_TEMPLATE, tools=tools,
                 tool_choice="none", chat_template_kwargs={"greeting": "."},
                 return_prompt_text=True)
    assert body["prompt_text"] == ("[tool get_weather]<user>Weather in Paris?"
                                   "<assistant>call get_weather(Paris)"
                                   "<tool name=get_weather id=call_1>sunny.")


def test_chat_echo_continues_the_last_message(http):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,"}]
    echoed = _chat(http, messages=messages, echo=True, add_generation_prompt=False,
                   continue_final_message=True)
    plain = _chat(http, messages=messages, add_generation_prompt=False,
                  continue_final_message=True)
    assert echoed["choices"][0]["message"]["content"] == \
        "Well," + plain["choices"][0]["message"]["content"]


# ----- request ids, priority, cache salt, keys, models -----

def test_request_id_and_x_request_id(http):
    response = _completion(http, prompt="Hi", request_id="my-id-1")
    assert response.json()["id"] == "cmpl-my-id-1"
    assert response.headers["x-request-id"] == "my-id-1"
    header_wins = http.post("/v1/chat/completions", headers={"x-request-id": "hdr-2"}, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "request_id": "body-2"})
    assert header_wins.json()["id"] == "chatcmpl-hdr-2"
    assert header_wins.headers["x-request-id"] == "hdr-2"
    assert http.get("/health", headers={"x-request-id": "h-3"}).headers["x-request-id"] == "h-3"
    assert len(http.get("/v1/models").headers["x-request-id"]) == 32  # one of our own


def test_priority_reaches_the_scheduler(server, http):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 100, "ignore_eos": True,
            "stream": True, "priority": 7, "request_id": "prio"}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert server.engine.scheduler.requests["cmpl-prio-0"].priority == 7
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"


def test_cache_salt_separates_prefix_cache_entries(server, http):
    prompt = list(range(10, 60))  # three full 16-token blocks

    def hits_after(**fields):
        _completion(http, prompt=prompt, max_tokens=1, **fields)
        return metric_value(http.get("/metrics").text, "vllm:prefix_cache_hits_total",
                            model_name=MODEL_NAME)

    first = hits_after(cache_salt="alice")
    assert hits_after(cache_salt="bob") == first  # another salt: nothing shared
    assert hits_after() == first  # no salt: nothing shared either
    assert hits_after(cache_salt="alice") >= first + 48  # the same salt shares the blocks


def test_every_api_key_works_and_others_do_not(server):
    for key in KEYS:
        with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0) as c:
            assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-other", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_retrieve_a_model(client, http):
    model = client.models.retrieve(MODEL_NAME)
    assert model.id == MODEL_NAME and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    missing = http.get("/v1/models/org/missing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


# ----- the sampler's fields (SamplingParams gets them on the sampler branch) -----

def test_logit_bias_forces_a_token(client, http):
    forced = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4,
                                       logit_bias={"42": 100}, **GREEDY)
    ids = _completion(http, prompt="Hi", logit_bias={"42": 100},
                      return_token_ids=True).json()["choices"][0]
    assert ids["token_ids"] == [42] * 4 and forced.choices[0].text == ids["text"]


def test_allowed_token_ids_limit_the_output(http):
    ids = _completion(http, prompt="Hi", max_tokens=6, temperature=1.0, seed=1,
                      allowed_token_ids=[40, 41], return_token_ids=True).json()
    assert set(ids["choices"][0]["token_ids"]) <= {40, 41}


def test_bad_words_never_appear(http, golden, tokenizer):
    plain = _completion(http, prompt=golden["prompt_ids"], max_tokens=8).json()["choices"][0]
    word = tokenizer.decode(golden["greedy_ids"][:1]).strip()
    banned = _completion(http, prompt=golden["prompt_ids"], max_tokens=8,
                         bad_words=[word]).json()["choices"][0]
    assert word in plain["text"] and word not in banned["text"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncate_prompt_tokens(http, side):
    prompt = list(range(10, 40))
    kept = prompt[-8:] if side == "left" else prompt[:8]
    cut = _completion(http, prompt=prompt, truncate_prompt_tokens=8, truncation_side=side,
                      return_token_ids=True).json()
    alone = _completion(http, prompt=kept, return_token_ids=True).json()
    assert cut["usage"]["prompt_tokens"] == 8
    assert cut["choices"][0]["prompt_token_ids"] == kept
    assert cut["choices"][0]["token_ids"] == alone["choices"][0]["token_ids"]


@pytest.mark.parametrize("keep", [0, -2, 129])
def test_truncate_prompt_tokens_out_of_range_is_a_400(http, keep):
    answer = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": list(range(10, 40)),
                                                "max_tokens": 2, "truncate_prompt_tokens": keep})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "truncate_prompt_tokens"


def test_logprobs_minus_one_is_the_whole_vocabulary_when_max_logprobs_allows(tiny_checkpoint,
                                                                             http):
    """vLLM's -1: every token's logprob, allowed only with --max-logprobs -1 (else a 400)."""
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0,
            "logprobs": -1, "return_tokens_as_token_ids": True}
    refused = http.post("/v1/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    running = start_server(engine_config(tiny_checkpoint(MODEL), max_logprobs=-1))
    try:
        with httpx.Client(base_url=running.base_url, timeout=CLIENT_TIMEOUT_S) as c:
            answer = c.post("/v1/completions", json=body).json()
    finally:
        running.stop()
    vocab = running.engine.model_config.vocab_size
    tops = answer["choices"][0]["logprobs"]["top_logprobs"]
    assert len(tops) == 2 and all(len(t) == vocab for t in tops)
    assert all(abs(sum(np.exp(list(t.values()))) - 1) < 1e-3 for t in tops)
