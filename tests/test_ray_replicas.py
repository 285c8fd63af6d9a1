"""Data-parallel replicas on a local Ray cluster, on the CPU with the tiny checkpoint.

Ray starts once for the module (``ray_cluster``), with a few logical GPUs so that the seed's
``@ray.remote(num_gpus=1)`` example runs as written (JAX in the actors still runs on the CPU).
One ``jaxpaged serve --data-parallel-size 2`` front end (``replicas``) serves the module's
scenarios: 200 concurrent streams spread over both replicas with the single engine's greedy
outputs, a client leaving its stream (the replica aborts the request), and a replica killed
mid-load that leaves no request hanging and comes back.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal

import httpx
import jax
import pytest
import ray  # the dev extra installs it

from jaxpaged import SamplingParams
from server_testing import MODEL, MODEL_NAME, metric_value, wait_until
from test_server_process import start_serve

pytestmark = pytest.mark.slow

TESTS = pathlib.Path(__file__).resolve().parent
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster for this module; its workers import this directory's modules."""
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), path) if p)
    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 1024 * 1024,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield ray
    finally:
        ray.shutdown()
        os.environ["PYTHONPATH"] = path


# The engine limits of every engine here (those of test_server_process.start_serve's command
# line): the same step shapes, compiled once into the session's cache.
ENGINE_ARGS = dict(dtype="float32", max_model_len=128, max_num_seqs=8,
                   max_num_batched_tokens=64, num_gpu_blocks_override=64)


@pytest.fixture(scope="module")
def single_engine(tiny_checkpoint):
    """The single-engine reference: one LLM in this process."""
    from jaxpaged import LLM

    return LLM(str(tiny_checkpoint(MODEL)), **ENGINE_ARGS)


# ----- the seed's Ray example, only the import changed -----

def test_the_seed_ray_example_runs_on_two_actors(ray_cluster, tiny_checkpoint, single_engine):
    from jaxpaged import LLM

    @ray.remote(num_gpus=1)
    class DistributedLLM:
        def __init__(self, model_path: str, **kwargs):
            self.llm = LLM(model=model_path, **kwargs)

        def generate(self, prompts, sampling_params):
            return self.llm.generate(prompts, sampling_params)

    kwargs = dict(ENGINE_ARGS, compilation_cache_dir=jax.config.jax_compilation_cache_dir)
    actors = [DistributedLLM.remote(str(tiny_checkpoint(MODEL)), **kwargs) for _ in range(2)]
    prompts = ["The capital of France is", "Hello, my name is"]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    results = ray.get([actor.generate.remote(prompts, params) for actor in actors])
    for actor in actors:
        ray.kill(actor)
    assert [[o.prompt for o in outputs] for outputs in results] == [prompts, prompts]
    expected = single_engine.generate(prompts, params, use_tqdm=False)
    for outputs in results:
        assert [o.outputs[0].token_ids for o in outputs] == [
            e.outputs[0].token_ids for e in expected]
        assert all(o.outputs[0].text and o.finished for o in outputs)


# ----- jaxpaged serve --data-parallel-size 2 -----

class ReplicaServer:
    """`jaxpaged serve --data-parallel-size 2 --ray-address ...` as users run it, joining the
    module's Ray cluster, on a loopback port."""

    def __init__(self, model_dir: pathlib.Path, address: str):
        self.process, self.base_url, self.log = start_serve(
            model_dir, extra=["--data-parallel-size", "2", "--ray-address", address])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, "".join(self.log)

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=30).text

    def health(self) -> dict:
        return httpx.get(f"{self.base_url}/health", timeout=30).json()


@pytest.fixture(scope="module")
def replicas(ray_cluster, tiny_checkpoint):
    server = ReplicaServer(tiny_checkpoint(MODEL), ray.get_runtime_context().gcs_address)
    yield server
    server.stop()


def prompt(i: int) -> str:
    return f"{i} is a number and the engine"


async def stream_completion(client: httpx.AsyncClient, text: str, max_tokens: int = MAX_TOKENS,
                            streaming: asyncio.Semaphore | None = None) -> dict:
    """One streamed greedy completion: its text, finish reason and error event, if any;
    ``streaming`` is released once its first token arrived."""
    body = {"model": MODEL_NAME, "prompt": text, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": max_tokens > MAX_TOKENS}
    result = {"text": "", "finish_reason": None, "error": None, "status": None, "done": False}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        result["status"] = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                result["done"] = True
                continue
            event = json.loads(data)
            if "error" in event:
                result["error"] = event["error"]
                continue
            if streaming is not None and not result["text"]:
                streaming.release()
            choice = event["choices"][0]
            result["text"] += choice["text"]
            result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
    return result


async def many_streams(base_url: str, texts: list[str], timeout: float = 120,
                       **kwargs) -> list[dict]:
    """Every text as its own concurrent stream; raises TimeoutError if one hangs."""
    limits = httpx.Limits(max_connections=len(texts))
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(stream_completion(client, t, **kwargs) for t in texts),
                           return_exceptions=True), timeout)


def replica_tokens(replicas, replica: int) -> float:
    """Tokens replica ``replica`` has generated (its own counter, labelled by the front end)."""
    return metric_value(replicas.metrics(), "vllm:generation_tokens_total", replica=str(replica))


def successes(metrics: str, replica: int) -> float:
    """Requests replica ``replica`` finished (max_tokens reached or EOS)."""
    return sum(metric_value(metrics, "vllm:request_success_total", replica=str(replica),
                            finished_reason=reason) for reason in ("length", "stop"))


def test_200_streams_spread_over_both_replicas_with_the_single_engine_outputs(
        replicas, single_engine):
    texts = [prompt(i) for i in range(200)]
    results = asyncio.run(many_streams(replicas.base_url, texts))
    single = single_engine.generate(texts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                                    use_tqdm=False)
    assert [r["text"] for r in results] == [o.outputs[0].text for o in single]
    assert all(r["status"] == 200 and r["done"] and r["error"] is None for r in results)
    metrics = replicas.metrics()
    per_replica = [successes(metrics, r) for r in (0, 1)]
    assert sum(per_replica) == 200 and min(per_replica) >= 50, per_replica
    health = replicas.health()
    assert [r["state"] for r in health["replicas"]] == ["serving", "serving"]


def test_health_reports_each_replica_and_the_single_pool_view_is_refused(replicas):
    health = httpx.get(f"{replicas.base_url}/health", timeout=30)
    assert health.status_code == 200
    states = health.json()["replicas"]
    assert [(r["replica"], r["state"]) for r in states] == [(0, "serving"), (1, "serving")]
    assert len({r["pid"] for r in states}) == 2 and os.getpid() not in {r["pid"] for r in states}
    assert httpx.get(f"{replicas.base_url}/engine/state", timeout=30).status_code == 503


def aborted(metrics: str) -> float:
    return sum(metric_value(metrics, "jaxpaged:request_aborted_total", replica=str(r))
               for r in (0, 1))


def test_a_client_leaving_a_stream_aborts_its_request_on_the_replica(replicas):
    before = aborted(replicas.metrics())
    body = {"model": MODEL_NAME, "prompt": prompt(3000), "max_tokens": 100, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{replicas.base_url}/v1/completions", json=body,
                      timeout=60) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        assert len([next(events) for _ in range(3)]) == 3
    # the replica's engine aborted it (and freed its blocks) long before 100 tokens
    assert wait_until(lambda: aborted(replicas.metrics()) == before + 1, timeout=30)
    running = [metric_value(replicas.metrics(), "vllm:num_requests_running", replica=str(r))
               for r in (0, 1)]
    assert running == [0, 0]


def test_a_killed_replica_hangs_nothing_and_comes_back(replicas):
    """60 long streams; once 10 of them stream, replica 0's process is killed: its running
    requests (streamed) end with an error event, its waiting ones (nothing streamed) are retried
    on replica 1, and every stream ends with [DONE]."""
    victim = replicas.health()["replicas"][0]["pid"]
    retried_before = metric_value(replicas.metrics(), "jaxpaged:replica_requests_retried_total")
    tokens_before = replica_tokens(replicas, 0)

    async def load_then_kill() -> list[dict]:
        streaming = asyncio.Semaphore(0)
        task = asyncio.ensure_future(many_streams(
            replicas.base_url, [prompt(1000 + i) for i in range(60)], max_tokens=100,
            streaming=streaming))
        for _ in range(10):
            await asyncio.wait_for(streaming.acquire(), 60)
        # Replica 0 itself must be streaming (the first streams may all be replica 1's): it has
        # sent tokens of this load, and more streams have begun since, so some reached clients.
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, replica_tokens, replicas, 0) < tokens_before + 50:
            await asyncio.sleep(0.05)
        for _ in range(5):
            await asyncio.wait_for(streaming.acquire(), 60)
        os.kill(victim, signal.SIGKILL)  # mid-load
        return await task

    results = asyncio.run(load_then_kill())
    assert not [r for r in results if isinstance(r, BaseException)], results  # none hung
    assert all(r["status"] == 200 and r["done"] for r in results)  # each ended with [DONE]
    finished = [r for r in results if r["error"] is None]
    failed = [r for r in results if r["error"] is not None]
    assert all(r["finish_reason"] == "length" for r in finished)
    assert failed and all(r["error"]["code"] == "engine_error" and "replica 0 died" in
                          r["error"]["message"] for r in failed)
    assert len(finished) >= 30  # replica 1's own and the retried ones
    retried = metric_value(replicas.metrics(), "jaxpaged:replica_requests_retried_total")
    assert retried > retried_before
    assert wait_until(lambda: replicas.health()["replicas"][0]["restarts"] == 1, timeout=120)
    back = replicas.health()["replicas"][0]
    assert back["state"] == "serving" and back["pid"] != victim and back["last_error"]
    # the restarted replica takes traffic again
    again = asyncio.run(many_streams(replicas.base_url, [prompt(2000 + i) for i in range(40)]))
    assert all(r["finish_reason"] in ("length", "stop") and r["error"] is None for r in again)
    assert successes(replicas.metrics(), 0) > 0  # counted by the new actor
    assert metric_value(replicas.metrics(), "jaxpaged:replica_restarts_total", replica="0") == 1
