"""Bad input and bad luck: OpenAI-style error JSON with the right status, and nothing lost.

400 for every kind of bad request (naming the field), 404/405/413 for bad routes and bodies, 503
when the waiting queue is full or the server drains, 500 for an engine failure in one step, after
which the server keeps serving with a sound KV pool.
"""

import asyncio

import httpx
import openai
import pytest

from server_testing import (CLIENT_TIMEOUT_S, MODEL, MODEL_NAME, engine_config, metric_value, poll,
                            start_server, wait_until)

MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = start_server(engine_config(tiny_checkpoint(MODEL), max_waiting=1),
                           max_body_bytes=MAX_BODY_BYTES)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as c:
        yield c


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, **fields}


BAD_REQUESTS = [
    # (endpoint, body, param named in the error)
    ("completions", {"model": MODEL_NAME, "max_tokens": 4}, "prompt"),
    ("chat", {"model": MODEL_NAME}, "messages"),
    ("completions", completion(prompt=5), "prompt"),
    ("completions", completion(prompt=[]), "prompt"),
    ("completions", completion(prompt=["ok", 3]), "prompt"),
    ("completions", completion(prompt=[1, 99999]), "prompt"),
    ("completions", completion(temperature="hot"), "temperature"),
    ("completions", completion(temperature=-1), "temperature"),
    ("completions", completion(top_p=0), "top_p"),
    ("completions", completion(top_k=-2), "top_k"),
    ("completions", completion(min_p=1.5), "min_p"),
    ("completions", completion(presence_penalty=3), "presence_penalty"),
    ("completions", completion(frequency_penalty=-2.5), "frequency_penalty"),
    ("completions", completion(repetition_penalty=0), "repetition_penalty"),
    ("completions", completion(max_tokens="4"), "max_tokens"),
    ("completions", completion(max_tokens=0), "max_tokens"),
    ("completions", completion(min_tokens=9), "min_tokens"),
    ("completions", completion(n=0), "n"),
    ("completions", completion(n=1.5), "n"),
    ("completions", completion(n=9), "n"),  # more than max_num_seqs=8
    ("completions", completion(seed=2**70), "seed"),
    ("completions", completion(stop=5), "stop"),
    ("completions", completion(stop=[""]), "stop"),
    ("completions", completion(stop_token_ids=[100000]), "stop_token_ids"),
    ("completions", completion(ignore_eos="yes"), "ignore_eos"),
    ("completions", completion(stream="yes"), "stream"),
    ("completions", completion(logprobs=True), "logprobs"),
    ("completions", completion(logprobs=21), "logprobs"),
    ("completions", completion(stream_options={"include_usage": True}), "stream_options"),
    ("completions", completion(stream=True, stream_options={"include_usage": 1}),
     "stream_options.include_usage"),
    ("completions", completion(prompt=list(range(5, 205))), "prompt"),  # over max_model_len
    ("completions", completion(prompt=list(range(5, 105)), max_tokens=50), "max_tokens"),
    ("completions", completion(model="gpt-4"), "model"),
    ("completions", completion(model=7), "model"),
    ("completions", completion(suffix="!"), "suffix"),
    ("completions", completion(echo="yes"), "echo"),
    ("completions", completion(logit_bias={"five": 10}), "logit_bias"),
    ("completions", completion(logit_bias={"5": 101}), "logit_bias"),
    ("completions", completion(priority=1), "priority"),  # needs --scheduling-policy priority
    ("completions", completion(frobnicate=1), "frobnicate"),  # no client sends it: unknown
    ("chat", chat(messages=[{"role": "user", "content": "hi", "colour": "red"}]),
     "messages[0].colour"),
    ("chat", chat(chat_template="{{ messages }}"), "chat_template"),  # not trusted here
    ("chat", chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"),
     "tool_choice"),
    ("chat", chat(chat_template_kwargs={"tokenize": True}), "chat_template_kwargs.tokenize"),
    ("completions", completion(best_of=3), "best_of"),
    ("chat", chat(messages=[]), "messages"),
    ("chat", chat(messages=["hi"]), "messages[0]"),
    ("chat", chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("chat", chat(messages=[{"role": "user", "content": 3}]), "messages[0].content"),
    ("chat", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "messages[0].content[0]"),
    ("chat", chat(logprobs="yes"), "logprobs"),
    ("chat", chat(top_logprobs=2), "top_logprobs"),  # without logprobs=true
    ("chat", chat(logprobs=True, top_logprobs=25), "top_logprobs"),
    ("chat", chat(max_completion_tokens=500), "max_completion_tokens"),
    ("chat", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("chat", chat(response_format={"type": "xml"}), "response_format.type"),
    ("chat", chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema"),
    ("completions", completion(guided_regex="[unclosed"), None),
    ("completions", completion(guided_regex="a", guided_choice=["a"]), "guided_choice"),
    ("chat", chat(structured_outputs={"regex": "a", "choice": ["a"]}), "structured_outputs"),
    ("chat", chat(structured_outputs={"pattern": "a"}), "structured_outputs.pattern"),
    ("chat", chat(guided_decoding_backend="xgrammar", guided_regex="a"),
     "guided_decoding_backend"),
    ("chat", chat(guided_whitespace_pattern=" "), "guided_whitespace_pattern"),
    ("chat", chat(response_format={"type": "json_object"}, guided_regex="a"), "guided_regex"),
    ("chat", chat(add_generation_prompt=True, continue_final_message=True), "messages"),
]


@pytest.mark.parametrize("endpoint,body,param", BAD_REQUESTS,
                         ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_400_naming_the_field(http, endpoint, body, param):
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"prompt": NaN}', b"\xff\xfe",
                                     b"[" * 20_000 + b"]" * 20_000],
                         ids=["malformed", "array", "nan", "not-utf8", "deeply-nested"])
def test_bodies_that_are_not_a_json_object_get_400(http, content):
    response = http.post("/v1/completions", content=content,
                         headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_routes_methods_and_sizes(http):
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert http.get("/v1/completions").status_code == 405
    too_big = http.post("/v1/completions", json=completion(prompt="x" * MAX_BODY_BYTES))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"


def test_openai_client_raises_bad_request_and_nothing_is_left_queued(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError, match="temperature"):
            c.completions.create(model=MODEL_NAME, prompt="Hi", temperature=-3)
    assert not server.engine.has_unfinished_requests()
    assert server.pool_is_full()


def fail_next_step(engine, lose_kv_pool: bool = False) -> None:
    """The next ``runner.dispatch`` (every step's, with or without async scheduling) raises once
    (optionally after deleting the KV pool, as a failure after buffer donation would)."""
    runner = engine.runner

    def failing(scheduler_output):
        del runner.dispatch  # back to the real method for the following steps
        if lose_kv_pool:
            runner.kv_cache.k.delete()
        raise RuntimeError("injected step failure")

    runner.dispatch = failing


@pytest.mark.parametrize("lose_kv_pool", [False, True], ids=["pool-kept", "pool-lost"])
def test_engine_failure_is_a_500_and_the_server_keeps_serving(server, http, lose_kv_pool):
    # 40 prompt tokens fill 2 blocks, which the prefix cache keeps after the request ends.
    body = completion(prompt=list(range(10, 50)), max_tokens=8, temperature=0, ignore_eos=True)
    expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    failed_before = metric_value(http.get("/metrics").text, "jaxpaged:request_failed_total")
    fail_next_step(server.engine, lose_kv_pool)
    response = http.post("/v1/completions", json=completion(prompt="Another prompt"))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "engine_error"
    assert "injected step failure" in response.json()["error"]["message"]
    assert metric_value(http.get("/metrics").text, "jaxpaged:request_failed_total") \
        == failed_before + 1
    # A zeroed pool must not be read through stale prefix-cache entries: same text again.
    again = http.post("/v1/completions", json=body)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected
    assert wait_until(server.pool_is_full)


def test_engine_failure_mid_stream_is_an_error_event(server):
    fail_next_step(server.engine)
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as c:
        with pytest.raises(openai.APIError, match="injected step failure"):
            for _ in c.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4,
                                          stream=True):
                pass
        assert c.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).usage
    assert wait_until(server.pool_is_full)


def test_full_waiting_queue_gets_503(server):
    long = completion(prompt="Busy", max_tokens=100, ignore_eos=True)
    scheduler = server.engine.scheduler

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as c:
            running = []
            for i in range(8):  # max_num_seqs=8: all run (one at a time: max_waiting=1)
                running.append(asyncio.create_task(c.post("/v1/completions", json=long)))
                assert await poll(lambda: scheduler.num_running == i + 1)
            waiting = asyncio.create_task(c.post("/v1/completions", json=completion()))
            assert await poll(lambda: scheduler.num_waiting == 1)  # max_waiting=1: now full
            refused = await c.post("/v1/completions", json=completion())
            done = await asyncio.gather(*running, waiting)
            return refused, done

    refused, done = asyncio.run(scenario())
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "queue_full"
    assert [r.status_code for r in done] == [200] * 9
    assert wait_until(server.pool_is_full)


def test_draining_server_refuses_new_requests_with_503(server, http):
    server.async_engine.drain()
    try:
        response = http.post("/v1/completions", json=completion())
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
        assert http.get("/health").status_code == 503
    finally:
        server.async_engine._draining = False  # let later tests in this module run
    assert http.post("/v1/completions", json=completion()).status_code == 200

