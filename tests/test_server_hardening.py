"""Issue #22: one request must never hurt the others.

Each numbered case of the issue has its regression test here, against one real server (tiny
model, real engine thread) started once for the module. Every test also checks that an innocent
request running beside the hostile one finishes normally.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from jaxpaged.core.request import Request
from jaxpaged.core.scheduler import Scheduler
from jaxpaged.core.scheduler_config import SchedulerConfig
from jaxpaged.sampling_params import SamplingParams

from server_testing import MODEL, MODEL_NAME, engine_config, poll, start_server, wait_until

MAX_PROMPTS = 64


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = start_server(engine_config(tiny_checkpoint(MODEL)),
                           max_prompts_per_request=MAX_PROMPTS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], **fields}


INNOCENT = completion(prompt="An innocent request", max_tokens=24, ignore_eos=True, stream=True)


async def _stream_events(c: httpx.AsyncClient, body: dict) -> list[str]:
    async with c.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        return [line async for line in response.aiter_lines() if line.startswith("data: ")]


def beside_innocent(server, hostile) -> tuple[list[str], object]:
    """Runs ``hostile(client)`` while an innocent stream runs; (the stream's events, the
    hostile coroutine's result)."""

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as c:
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
    requests = [Request(f"r{i}", [1, 2], SamplingParams()) for i in range(100_000)]
    for request in requests:
        scheduler.add_request(request)
    scheduler.abort_requests([r.request_id for r in requests[1:-1]])
    assert [r.request_id for r in scheduler.waiting] == ["r0", "r99999"]
    assert set(scheduler.requests) == {"r0", "r99999"}
    assert all(r.is_finished() for r in requests[1:-1])


# ----- 8 (part): a prompt list is all texts or all token ids -----

def test_8_mixed_prompt_list_is_400(http):
    response = http.post("/v1/completions", json=completion(prompt=["a", [1]]))
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
