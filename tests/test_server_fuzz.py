"""Fuzzing both generation endpoints (and /tokenize) from the request schema: every field of the
inventory (``request_fields.py``) gets wrong types, nulls, huge numbers, NaN/inf, lone
surrogates, nested junk, and unknown fields ride along. Every answer must be 200 or a 4xx with
OpenAI's error JSON, never a 500, never a hang; innocent streams running all along must finish.

Bounded and reproducible (``derandomize``): one server for the module, a fixed number of examples.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpaged.server.request_fields import CHAT_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS

from server_testing import (CLIENT_TIMEOUT_S, MODEL, MODEL_NAME, engine_config, start_server,
                            wait_until)

EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

huge_ints = st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**30, -1, 0, 2**53 + 1])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 1e-320])
texts = st.text(max_size=12) | st.sampled_from(["\ud800", "a\udfffb", "\x00", "", "ok"])
scalars = st.none() | st.booleans() | st.integers(-3, 40) | huge_ints | floats | texts
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
small_counts = st.integers(-2, 6)  # valid token counts stay small: the fuzz stays fast


def field_values(name: str) -> st.SearchStrategy:
    if name in ("max_tokens", "max_completion_tokens", "n", "min_tokens"):
        return small_counts | junk
    if name == "model":
        return st.just(MODEL_NAME) | junk
    return junk


def messages() -> st.SearchStrategy:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "wizard"]) | junk,
         "content": texts | junk},
        optional={name: junk for name in MESSAGE_FIELDS if name not in ("role", "content")})
    return st.lists(message, min_size=0, max_size=3) | junk


def bodies(table: dict, required: dict) -> st.SearchStrategy:
    optional = {name: field_values(name) for name in table if name not in required}
    optional["an_unknown_field"] = junk
    return st.fixed_dictionaries(required, optional=optional)


COMPLETION_BODIES = bodies(COMPLETION_FIELDS, {
    "prompt": texts | st.lists(st.integers(-2, 300), max_size=5)
    | st.lists(texts | st.lists(st.integers(0, 300), max_size=3), max_size=3) | junk})
CHAT_BODIES = bodies(CHAT_FIELDS, {"messages": messages()})


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = start_server(engine_config(tiny_checkpoint(MODEL)), max_prompts_per_request=8)
    yield running
    running.stop()


class InnocentStreams:
    """Streams requests in a loop on a thread while the fuzz runs; records how each ended."""

    def __init__(self, base_url: str):
        self._base_url, self._stop = base_url, threading.Event()
        self.endings: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> InnocentStreams:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        body = {"model": MODEL_NAME, "prompt": "innocent", "max_tokens": 12, "stream": True,
                "ignore_eos": True}
        with httpx.Client(base_url=self._base_url, timeout=CLIENT_TIMEOUT_S) as c:
            while not self._stop.is_set():
                with c.stream("POST", "/v1/completions", json=body) as response:
                    lines = [line for line in response.iter_lines() if line.startswith("data:")]
                errored = any('"error"' in line for line in lines)
                self.endings.append("ok" if response.status_code == 200 and not errored
                                    and lines[-1] == "data: [DONE]" else f"bad: {lines[-2:]}")


def check_answer(response: httpx.Response, streamed: bool) -> None:
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text[:500]
    if response.status_code == 200:
        if not streamed:
            assert "choices" in response.json() or "tokens" in response.json()
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]


def post(c: httpx.Client, path: str, body: dict) -> int:
    content = json.dumps(body, ensure_ascii=True)  # lone surrogates travel as \\ud800 escapes
    headers = {"content-type": "application/json"}
    streamed = body.get("stream") is True
    if streamed:
        with c.stream("POST", path, content=content, headers=headers) as response:
            if response.status_code == 200:
                data = [line for line in response.iter_lines() if line.startswith("data: ")]
                assert data[-1] == "data: [DONE]", data[-3:]
            else:
                response.read()  # an error answer is one JSON body (check_answer reads it)
    else:
        response = c.post(path, content=content, headers=headers)
    check_answer(response, streamed)
    return response.status_code


@pytest.mark.slow
def test_fuzz_both_endpoints_never_500_and_innocent_streams_finish(server):
    statuses: set[int] = set()
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as c, \
            InnocentStreams(server.base_url) as innocent:

        @FUZZ
        @given(body=COMPLETION_BODIES)
        def completions(body):
            statuses.add(post(c, "/v1/completions", body))

        @FUZZ
        @given(body=CHAT_BODIES)
        def chats(body):
            statuses.add(post(c, "/v1/chat/completions", body))

        @FUZZ
        @given(body=st.fixed_dictionaries({}, optional={
            "prompt": texts | junk, "messages": messages(), "model": junk,
            "add_special_tokens": junk, "return_token_strs": junk, "tokens": junk}))
        def tokenize(body):
            post(c, "/tokenize", body)
            post(c, "/detokenize", body)

        completions()
        chats()
        tokenize()
    assert {200, 400} <= statuses, statuses  # the fuzz reached both answers
    assert innocent.endings and all(e == "ok" for e in innocent.endings), innocent.endings
    assert wait_until(lambda: not server.engine.has_unfinished_requests(), timeout=30)
    assert wait_until(server.pool_is_full)
