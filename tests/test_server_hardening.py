"""Issue #22: one request must never hurt the others.

Each numbered case of the issue has its regression test here, against one real server (tiny
model, real engine thread) started once for the module. Every test also checks that an innocent
request running beside the hostile one finishes normally.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from jaxpaged.core.request import Request
from jaxpaged.core.scheduler import Scheduler
from jaxpaged.core.scheduler_config import SchedulerConfig
from jaxpaged.engine.faults import FaultInjector, RequestFault
from jaxpaged.sampling_params import SamplingParams

from server_testing import (CLIENT_TIMEOUT_S, MODEL, MODEL_NAME, engine_config, poll, server_logs,
                            start_server, wait_until)

MAX_PROMPTS = 64


@pytest.fixture(scope="module")
def faults():
    return FaultInjector()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, faults):
    running = start_server(engine_config(tiny_checkpoint(MODEL)), step_hook=faults,
                           max_prompts_per_request=MAX_PROMPTS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as c:
        yield c


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], **fields}


INNOCENT = completion(prompt="An innocent request", max_tokens=24, ignore_eos=True, stream=True,
                      temperature=0)


async def _stream_events(c: httpx.AsyncClient, body: dict) -> list[str]:
    async with c.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        return [line async for line in response.aiter_lines() if line.startswith("data: ")]


def beside_innocent(server, hostile) -> tuple[list[str], object]:
    """Runs ``hostile(client)`` while an innocent stream runs; (the stream's events, the
    hostile coroutine's result)."""

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as c:
            innocent = asyncio.create_task(_stream_events(c, INNOCENT))
            result = await hostile(c)
            return await innocent, result

    events, result = asyncio.run(scenario())
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), events[-3:]
    assert wait_until(server.pool_is_full)
    return events, result


# ----- 1: every numeric field is bounded before it reaches a device column -----

@pytest.mark.parametrize("endpoint,body,param", [
    ("chat", chat(min_tokens=2**63), "min_tokens"),
    ("chat", chat(min_tokens=2**31), "min_tokens"),
    ("chat", chat(max_completion_tokens=2**40), "max_completion_tokens"),
    ("completions", completion(top_k=2**40), "top_k"),
    ("completions", completion(n=2**63), "n"),
    ("completions", completion(truncate_prompt_tokens=2**62), "truncate_prompt_tokens"),
    ("completions", completion(prompt_logprobs=2**62), "prompt_logprobs"),
    ("completions", completion(seed=2**63), "seed"),
    ("completions", completion(priority=-(2**63) - 1), "priority"),
    ("completions", completion(temperature=1e300), "temperature"),
    ("chat", chat(repetition_penalty=1e39), "repetition_penalty"),
])
def test_1_huge_numbers_are_400_and_hurt_nobody(server, endpoint, body, param):
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    _, response = beside_innocent(server, lambda c: c.post(path, json=body))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("field,value", [("min_tokens", 2**63), ("max_tokens", 2**31),
                                         ("top_k", 2**31), ("n", 2**31), ("logprobs", 2**40),
                                         ("seed", 2**64), ("temperature", 1e39)])
def test_1_sampling_params_bound_every_number(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# ----- 2: many prompts cannot stall the engine -----

def test_2_too_many_prompts_is_400_before_anything_runs(server, http):
    _, response = beside_innocent(
        server, lambda c: c.post("/v1/completions", json=completion(prompt=[[5]] * 200_000)))
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert str(MAX_PROMPTS) in response.json()["error"]["message"]


def test_2_cancelling_many_waiting_prompts_leaves_the_engine_responsive(server):
    async def hostile(c):
        many = asyncio.create_task(c.post("/v1/completions", json=completion(
            prompt=[[5, k % 50 + 6] for k in range(MAX_PROMPTS)], max_tokens=100,
            ignore_eos=True)))
        assert await poll(lambda: server.engine.scheduler.num_waiting > MAX_PROMPTS // 2)
        many.cancel()  # the client gives up: every prompt is aborted in one batch
        with pytest.raises(asyncio.CancelledError):
            await many
        return await c.post("/v1/completions", json=completion())

    _, after = beside_innocent(server, hostile)
    assert after.status_code == 200


def test_2_scheduler_aborts_a_long_waiting_queue_in_one_pass():
    """100,000 waiting requests aborted by one call (one deque.remove each would be 5e9 steps)."""
    scheduler = Scheduler(SchedulerConfig(max_model_len=32, block_size=16), num_blocks=8)
    params = SamplingParams()
    requests = [Request(f"r{i}", [1, 2], params) for i in range(100_000)]
    for request in requests:
        scheduler.add_request(request)
    scheduler.abort_requests([r.request_id for r in requests[1:-1]])
    assert [r.request_id for r in scheduler.waiting] == ["r0", "r99999"]
    assert set(scheduler.requests) == {"r0", "r99999"}
    assert all(r.is_finished() for r in requests[1:-1])


def test_2_the_server_bounds_its_waiting_queue_by_default():
    import argparse

    from jaxpaged.server.args import (DEFAULT_SERVER_MAX_WAITING, add_server_arguments,
                                      engine_config_from_args)

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    config = engine_config_from_args(parser.parse_args(["m"]), "m")
    assert config.max_waiting == DEFAULT_SERVER_MAX_WAITING and 0 < config.max_waiting < 10**6


@pytest.mark.slow
def test_2_stopping_returns_while_a_step_never_ends(tiny_checkpoint):
    """A step stuck for ever (a hook that blocks) cannot keep shutdown from returning: ``stop``
    gives up after its timeout and leaves the daemon thread behind. Released, the step fails
    its request (no model step to compile) and the thread sees the stop."""
    import threading
    import time

    from jaxpaged.engine.llm_engine import LLMEngine
    from jaxpaged.server.async_engine import AsyncEngine, EngineInput

    entered, release = threading.Event(), threading.Event()

    def stuck_step(scheduler_output):
        entered.set()
        release.wait(120)
        raise RequestFault(["stuck-0"], "the stuck step was released")

    async_engine = AsyncEngine(LLMEngine(engine_config(tiny_checkpoint(MODEL)),
                                         step_hook=stuck_step))

    async def scenario() -> tuple[list[bool], bool, bool]:
        async_engine.start(asyncio.get_running_loop())
        await async_engine.submit([EngineInput("stuck-0", None, [5, 6, 7],
                                               SamplingParams(max_tokens=2), time.time())])
        assert await asyncio.to_thread(entered.wait, 120)  # the engine thread is in the step
        stopped: list[bool] = []
        stopper = threading.Thread(target=lambda: stopped.append(async_engine.stop(0.2)))
        stopper.start()
        await asyncio.to_thread(stopper.join, 60)
        left_behind = async_engine._thread.is_alive()
        release.set()  # the step ends: the thread sees the stop (the loop still takes outputs)
        await asyncio.to_thread(async_engine._thread.join, 300)
        return stopped, left_behind, async_engine._thread.is_alive()

    try:
        stopped, left_behind, alive_at_the_end = asyncio.run(scenario())
    finally:
        release.set()
    assert stopped == [False] and left_behind  # stop returned, saying it left the thread
    assert not alive_at_the_end


# ----- 8 (part): a prompt list is all texts or all token ids -----

def test_8_mixed_prompt_list_is_400(http):
    response = http.post("/v1/completions", json=completion(prompt=["a", [1]]))
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


# ----- 3: lone surrogates are 400, and the connection stays usable -----

@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt[1]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
     '"stop": ["\\udc00"]}', "stop[0]"),
    ("/tokenize", '{"prompt": "\\ud83d"}', "prompt"),
])
def test_3_lone_surrogates_are_400_on_a_kept_alive_connection(server, path, body, param):
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as c:  # one connection
        response = c.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert c.post("/v1/completions", json=completion()).status_code == 200


# ----- 7: cross-site requests -----

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_7_bodies_not_typed_json_get_415(server, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as c:
        response = c.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                          headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert not server.engine.has_unfinished_requests()


def test_7_json_with_charset_is_accepted(http):
    response = http.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                         headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200


@pytest.fixture(scope="module")
def guarded_app(server):
    """The same engine behind an app with loopback-only hosts and one allowed origin."""
    from jaxpaged.server.app import build_app
    from jaxpaged.server.origins import LOOPBACK_NAMES
    from jaxpaged.server.settings import ServerSettings

    return build_app(server.engine, ServerSettings(
        served_model_names=(MODEL_NAME,), allowed_hosts=LOOPBACK_NAMES,
        allowed_origins=("http://app.example",)))


def _asgi_client(app, host: str):
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url=f"http://{host}")


@pytest.mark.parametrize("host,origin,status", [
    ("127.0.0.1:8000", None, 200), ("localhost", None, 200), ("[::1]:8000", None, 200),
    ("evil.example", None, 400), ("127.0.0.1.evil.example:8000", None, 400),
    ("127.0.0.1:8000", "http://evil.example", 403),
    ("127.0.0.1:8000", "http://localhost:3000", 200),  # a page of this machine
    ("127.0.0.1:8000", "http://app.example", 200),
])
def test_7_host_and_origin_checks(guarded_app, host, origin, status):
    async def scenario():
        async with _asgi_client(guarded_app, host) as c:
            headers = {"origin": origin} if origin else {}
            return await c.get("/v1/models", headers=headers)

    response = asyncio.run(scenario())
    assert response.status_code == status, response.text
    if status != 200:
        assert response.json()["error"]["message"]


def test_7_allowed_origin_gets_a_cors_preflight_answer(guarded_app):
    async def scenario():
        async with _asgi_client(guarded_app, "127.0.0.1:8000") as c:
            return await c.options("/v1/completions", headers={
                "origin": "http://app.example", "access-control-request-method": "POST",
                "access-control-request-headers": "content-type"})

    response = asyncio.run(scenario())
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://app.example"


def test_7_loopback_binding_defaults_to_loopback_hosts():
    import argparse

    from jaxpaged.server.args import add_server_arguments, server_settings_from_args

    def settings(*argv):
        parser = argparse.ArgumentParser()
        add_server_arguments(parser)
        return server_settings_from_args(parser.parse_args(["m", *argv]), "m")

    assert settings().allowed_hosts == ("localhost", "127.0.0.1", "::1")
    assert settings("--host", "0.0.0.0").allowed_hosts is None
    assert settings("--allowed-hosts", "a.example").allowed_hosts == ("a.example",)
    assert settings("--allowed-origins", '["http://x"]').allowed_origins == ("http://x",)


# ----- 8: smaller leaks -----

def test_8_trailing_slash_is_404_not_a_redirect_to_the_host_header(http):
    response = http.post("/v1/completions/", json=completion(),
                         headers={"host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers


@pytest.mark.parametrize("content", [b'{"prompt": 1' + b"0" * 5000 + b"}",
                                     b"[" * 20_000 + b"]" * 20_000, b'{"a": 1,'])
def test_8_json_errors_name_no_python_internals(http, content):
    response = http.post("/v1/completions", content=content,
                         headers={"content-type": "application/json"})
    message = response.json()["error"]["message"]
    assert response.status_code == 400
    assert "sys." not in message and "recursion" not in message and "Error" not in message


@pytest.mark.parametrize("path,body", [("/v1/completions", completion()),
                                       ("/v1/completions", completion(temperature=-1)),
                                       ("/v1/completions", completion(stream=True)),
                                       ("/tokenize", {"prompt": "hi"}),
                                       ("/v1/nothing", {})])
def test_8_x_request_id_is_echoed_on_every_answer(http, path, body):
    response = http.post(path, json=body, headers={"x-request-id": "my-id-42"})
    assert response.headers["x-request-id"] == "my-id-42"


# ----- 4: tokenization is bounded and off the event loop -----

def test_4_a_text_too_long_for_any_context_is_refused_before_tokenizing(server, http):
    ctx = server.app.state.context
    too_long = "x" * (ctx.max_prompt_chars + 1)
    for path, body, param in [("/v1/completions", completion(prompt=too_long), "prompt"),
                              ("/v1/chat/completions", chat(messages=[
                                  {"role": "user", "content": too_long}]), "messages"),
                              ("/tokenize", {"prompt": too_long}, "prompt")]:
        response = http.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["code"] == "context_length_exceeded"


def test_4_tokenization_runs_on_worker_threads_and_health_answers_meanwhile(server):
    import threading

    ctx = server.app.state.context
    long_text = "word " * (ctx.max_prompt_chars // 5 - 1)  # tokenized, then too many tokens

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as c:
            heavy = [asyncio.create_task(c.post("/tokenize", json={"prompt": long_text}))
                     for _ in range(4)]
            health = await c.get("/health")
            return health, await asyncio.gather(*heavy)

    health, heavy = asyncio.run(scenario())
    assert health.status_code == 200
    assert all(r.status_code == 200 and r.json()["count"] > 128 for r in heavy)
    assert any(t.name.startswith("jaxpaged-tokenize") for t in threading.enumerate())


# ----- 5: bounded stop lists -----

def test_5_huge_stop_lists_are_400_and_hurt_nobody(server):
    many = [f"stop{i}" for i in range(20_000)]
    _, response = beside_innocent(
        server, lambda c: c.post("/v1/completions", json=completion(stop=many, n=4)))
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    long = completion(stop=["y" * 5000])
    assert httpx.post(f"{server.base_url}/v1/completions", json=long).status_code == 400


def test_5_stop_lists_within_the_limits_work(http):
    from jaxpaged.sampling_params import MAX_STOP_STRINGS

    body = completion(stop=[f"zz{i}" for i in range(MAX_STOP_STRINGS)], n=2)
    assert http.post("/v1/completions", json=body).status_code == 200


# ----- 6: connections that never finish a request are closed -----

@contextlib.contextmanager
def guarded_bare_server(*flags: str):
    """A bare uvicorn server with the serve command's connection guards (``flags``: serve
    flags); yields its (host, port)."""
    import argparse
    import threading

    import uvicorn

    from jaxpaged.server.args import add_server_arguments
    from jaxpaged.server.launch import connection_limits

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    args = parser.parse_args(["m", *flags])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off", **connection_limits(args)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout=30)
    try:
        yield server.servers[0].sockets[0].getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def timed_server():
    """Short read and keep-alive timeouts: connections that idle are closed quickly."""
    with guarded_bare_server("--timeout-request-read", "0.3", "--timeout-keep-alive", "0.3") as a:
        yield a


@pytest.fixture(scope="module")
def limited_server():
    """At most 4 connections, and timeouts long enough that none closes during a test (a
    timeout closing an idle connection would make room for the one over the limit)."""
    with guarded_bare_server("--limit-concurrency", "4", "--timeout-request-read", "60",
                             "--timeout-keep-alive", "60") as address:
        yield address


def _closed_by_server(sock, timeout: float = 20.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except (TimeoutError, ConnectionResetError) as e:
        return isinstance(e, ConnectionResetError)


@pytest.mark.parametrize("sent", [b"", b"POST / HTTP/1.1\r\nHost: x\r\n",
                                  b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab"],
                         ids=["silent", "half-head", "stalled-body"])
def test_6_half_open_connections_are_closed(timed_server, sent):
    import socket

    with socket.create_connection(timed_server) as sock:
        sock.sendall(sent)
        assert _closed_by_server(sock)


def test_6_idle_kept_alive_connections_are_closed_and_whole_requests_served(timed_server):
    import socket

    with socket.create_connection(timed_server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(20)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert _closed_by_server(sock)  # keep-alive timeout


def test_6_connections_beyond_the_limit_get_503(limited_server):
    import socket

    idle = [socket.create_connection(limited_server) for _ in range(4)]
    try:
        with socket.create_connection(limited_server) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(20)
            assert sock.recv(4096).startswith(b"HTTP/1.1 503")
    finally:
        for s in idle:
            s.close()


# ----- a failure inside a step fails only the requests it belongs to -----

def _text(events: list[str]) -> str:
    import json

    return "".join(json.loads(e[6:])["choices"][0]["text"] for e in events
                   if e != "data: [DONE]" and json.loads(e[6:])["choices"])


def test_a_fault_in_one_request_spares_the_streams_beside_it(server, http, faults):
    """A ``RequestFault`` naming the bad request: it gets a 500, the innocent stream running in
    the same steps is recomputed and ends with exactly the text it has when run alone."""
    alone = asyncio.run(_alone(server))

    async def hostile(c):
        assert await poll(lambda: server.engine.scheduler.num_running >= 1)
        faults.fail_request("cmpl-bad-one")
        return await c.post("/v1/completions", json=completion(prompt="Bad", max_tokens=8),
                            headers={"x-request-id": "bad-one"})

    fired = faults.fired
    events, bad = beside_innocent(server, hostile)
    assert faults.fired == fired + 1
    assert _text(events) == alone  # recomputed: nothing lost or changed (greedy)
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_error"
    assert bad.headers["x-request-id"] == "bad-one"
    assert http.post("/v1/completions", json=completion()).status_code == 200


async def _alone(server) -> str:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as c:
        return _text(await _stream_events(c, {**INNOCENT, "temperature": 0}))


# ----- client disconnects are one INFO line -----

def test_a_client_leaving_mid_body_is_one_info_line(server, caplog):
    import logging
    import socket

    host, port = server.base_url.removeprefix("http://").split(":")
    with server_logs(caplog):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro")
            assert wait_until(lambda: server.server.server_state.tasks, timeout=60)
        assert wait_until(lambda: any("client disconnected" in r.getMessage()
                                      for r in caplog.records), timeout=60)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert wait_until(lambda: not server.server.server_state.tasks, timeout=60)
