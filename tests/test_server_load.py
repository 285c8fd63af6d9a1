"""Clients that leave, many clients at once, and the serving benchmark against a live server.

Every scenario ends by checking that the engine holds no request and every KV block is back in
the pool (block 0 is the null block, so ``num_free_blocks == num_blocks - 1``).
"""

import asyncio
import json
import logging
import pathlib
import random
import subprocess
import sys
import time

import httpx
import pytest

from server_testing import (CLIENT_TIMEOUT_S, MODEL, MODEL_NAME, engine_config, metric_value, poll,
                            server_logs, start_server, wait_until)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = start_server(engine_config(tiny_checkpoint(MODEL)))
    yield running
    running.stop()


def aborted_total(server) -> float:
    return metric_value(httpx.get(f"{server.base_url}/metrics").text,
                        "jaxpaged:request_aborted_total")


def long_request(**fields):
    return {"model": MODEL_NAME, "prompt": "The engine", "max_tokens": 110, "ignore_eos": True,
            **fields}


def assert_engine_is_empty(server):
    assert wait_until(lambda: not server.engine.has_unfinished_requests() and server.pool_is_full())


def test_client_closing_a_stream_aborts_its_request(server, caplog):
    aborted = aborted_total(server)
    with server_logs(caplog):
        with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as client:
            with client.stream("POST", "/v1/completions",
                               json=long_request(stream=True, n=2)) as r:
                lines = r.iter_lines()
                assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: "))
                assert not server.pool_is_full()  # the request holds blocks while it streams
        assert_engine_is_empty(server)  # long before 110 tokens could have been generated
    assert aborted_total(server) == aborted + 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_client_leaving_before_a_non_streamed_answer_aborts_its_request(server):
    aborted = aborted_total(server)

    async def leave_while_it_runs():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as client:
            request = asyncio.create_task(client.post("/v1/completions", json=long_request(n=4)))
            assert await poll(lambda: server.engine.scheduler.num_running > 0)
            request.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(leave_while_it_runs())
    assert_engine_is_empty(server)
    assert aborted_total(server) == aborted + 1


async def _one_client(client: httpx.AsyncClient, index: int, rng: random.Random) -> dict:
    """One streaming request; it may stop reading after a few events, or be cancelled by a
    deadline anywhere (before admission, mid-stream)."""
    max_tokens = rng.randint(2, 16)
    body = {"model": MODEL_NAME, "prompt": f"Request {index}: the block pool", "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": rng.choice([0.0, 1.0]),
            "n": rng.choice([1, 1, 2]), "stream_options": {"include_usage": True}}
    leave_after = rng.choice([None, None, 1, 3])  # None: read to the end
    deadline = rng.choice([None, None, None, 0.05, 0.5, 2.0])
    outcome = {"status": None, "done": False, "usage": None,
               "must_finish": leave_after is None and deadline is None}

    async def run():
        async with client.stream("POST", "/v1/completions", json=body) as response:
            outcome["status"] = response.status_code
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    outcome["done"] = True
                    break
                event = json.loads(line[6:])
                assert "error" not in event, event
                outcome["usage"] = event.get("usage") or outcome["usage"]
                events += 1
                if leave_after is not None and events >= leave_after:
                    break
    try:
        await asyncio.wait_for(run(), deadline)
    except TimeoutError:
        pass
    outcome["expected_tokens"] = max_tokens * body["n"]
    return outcome


def test_200_concurrent_streams_with_random_cancellations(server, caplog):
    """Clients leave at every point (before admission, mid-stream, mid-answer): each aborts its
    request, and none leaves a warning or a traceback in the log."""
    rng = random.Random(0)
    aborted = aborted_total(server)

    async def scenario():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits,
                                     timeout=CLIENT_TIMEOUT_S) as client:
            return await asyncio.gather(*(_one_client(client, i, rng) for i in range(200)))

    with server_logs(caplog):
        outcomes = asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    statuses = [o["status"] for o in outcomes if o["status"] is not None]
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    finished = [o for o in outcomes if o["done"]]
    assert all(o["done"] for o in outcomes if o["must_finish"])
    for o in finished:
        assert o["usage"]["completion_tokens"] == o["expected_tokens"]
    assert_engine_is_empty(server)
    assert aborted_total(server) - aborted >= 20  # the clients that left did abort


def engine_thread_cpu_ticks(server) -> int:
    """User + system clock ticks the engine thread has used (Linux /proc)."""
    tid = server.async_engine._thread.native_id
    fields = pathlib.Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def test_idle_engine_thread_sleeps(server):
    steps = []
    original = server.engine.step
    server.engine.step = lambda: steps.append(1) or original()
    try:
        before = engine_thread_cpu_ticks(server)
        time.sleep(1.0)
        assert engine_thread_cpu_ticks(server) - before <= 2  # a busy loop would burn ~100
        assert steps == []
    finally:
        del server.engine.step


def test_serving_benchmark_smoke(server, tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serving.py"), "--base-url", server.base_url,
         "--num-requests", "6", "--rates", "50", "inf", "--prompt-len", "4", "40",
         "--output-len", "2", "12", "--max-token-id", "400", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["model"] == MODEL_NAME
    assert [r["rate"] for r in report["results"]] == [50.0, "inf"]
    for summary in report["results"]:
        assert (summary["completed"], summary["failed"]) == (6, 0)
        assert summary["output_tok_s"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert summary[key]["p50"] <= summary[key]["p99"]
        assert summary["ttft_ms"]["p99"] <= summary["e2e_ms"]["p99"]
    assert_engine_is_empty(server)
