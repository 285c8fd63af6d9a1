"""Data-parallel replicas on a local Ray cluster, on the CPU with the tiny checkpoint.

Ray starts once for the module (``ray_cluster``), with a few logical GPUs so that the seed's
``@ray.remote(num_gpus=1)`` example runs as written (JAX in the actors still runs on the CPU).
One ``jaxpaged serve --data-parallel-size 2`` front end (``replicas``) serves the module's
scenarios: 200 concurrent streams spread over both replicas with the single engine's greedy
outputs, and a replica killed mid-load that leaves no request hanging and comes back.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal

import httpx
import pytest

from server_testing import MODEL, MODEL_NAME, engine_config, metric_value, poll, wait_until
from test_server_process import start_serve

ray = pytest.importorskip("ray")  # the dev extra installs it; CI has it
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


def replica_config(tiny_checkpoint, tmp_path_factory):
    """Small limits; the replicas share one compilation cache (a restart loads its programs)."""
    cache = tmp_path_factory.getbasetemp() / "replica-xla"
    return engine_config(tiny_checkpoint(MODEL), max_num_seqs=16, compilation_cache_dir=str(cache))


# ----- the seed's Ray example, only the import changed -----

def test_the_seed_ray_example_runs_on_two_actors(ray_cluster, tiny_checkpoint, tmp_path_factory):
    from jaxpaged import LLM, SamplingParams

    @ray.remote(num_gpus=1)
    class DistributedLLM:
        def __init__(self, model_path: str, **kwargs):
            self.llm = LLM(model=model_path, **kwargs)

        def generate(self, prompts, sampling_params):
            return self.llm.generate(prompts, sampling_params)

    config = replica_config(tiny_checkpoint, tmp_path_factory)
    kwargs = dict(dtype="float32", max_model_len=128, num_gpu_blocks_override=64,
                  compilation_cache_dir=config.compilation_cache_dir)
    actors = [DistributedLLM.remote(config.model, **kwargs) for _ in range(2)]
    prompts = ["The capital of France is", "Hello, my name is"]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    results = ray.get([actor.generate.remote(prompts, params) for actor in actors])
    for actor in actors:
        ray.kill(actor)
    assert [[o.prompt for o in outputs] for outputs in results] == [prompts, prompts]
    expected = LLM(config.model, **kwargs).generate(prompts, params, use_tqdm=False)
    for outputs in results:
        assert [o.outputs[0].token_ids for o in outputs] == [
            e.outputs[0].token_ids for e in expected]
        assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outputs)


# ----- jaxpaged serve --data-parallel-size 2 -----

class ReplicaServer:
    """`jaxpaged serve --data-parallel-size 2 --ray-address ...` as users run it, joining the
    module's Ray cluster, on a loopback port."""

    def __init__(self, config, address: str):
        self.process, self.base_url, self.log = start_serve(
            pathlib.Path(config.model), env={**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"]},
            extra=["--data-parallel-size", "2", "--ray-address", address, "--max-num-seqs", "16",
                   "--compilation-cache-dir", config.compilation_cache_dir])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, "".join(self.log)

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=30).text

    def health(self) -> dict:
        return httpx.get(f"{self.base_url}/health", timeout=30).json()


@pytest.fixture(scope="module")
def replicas(ray_cluster, tiny_checkpoint, tmp_path_factory):
    address = ray.get_runtime_context().gcs_address
    server = ReplicaServer(replica_config(tiny_checkpoint, tmp_path_factory), address)
    yield server
    server.stop()


def prompt(i: int) -> str:
    return f"{i} is a number and the engine"


async def stream_completion(client: httpx.AsyncClient, text: str) -> dict:
    """One streamed completion: its text, finish reason and error event, if any."""
    body = {"model": MODEL_NAME, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}
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
            choice = event["choices"][0]
            result["text"] += choice["text"]
            result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
    return result


async def many_streams(base_url: str, texts: list[str], timeout: float = 120) -> list[dict]:
    limits = httpx.Limits(max_connections=len(texts))
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(stream_completion(client, t) for t in texts),
                           return_exceptions=True), timeout)


def successes(metrics: str, replica: int) -> float:
    """Requests replica ``replica`` finished (max_tokens reached or EOS)."""
    return sum(metric_value(metrics, "vllm:request_success_total", replica=str(replica),
                            finished_reason=reason) for reason in ("length", "stop"))


def test_200_streams_spread_over_both_replicas_with_the_single_engine_outputs(
        replicas, tiny_checkpoint, tmp_path_factory):
    from jaxpaged import LLM, SamplingParams

    texts = [prompt(i) for i in range(200)]
    results = asyncio.run(many_streams(replicas.base_url, texts))
    config = replica_config(tiny_checkpoint, tmp_path_factory)
    single = LLM(config.model, dtype="float32", max_model_len=128, num_gpu_blocks_override=64,
                 max_num_seqs=16).generate(
        texts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [r["text"] for r in results] == [o.outputs[0].text for o in single]
    assert all(r["status"] == 200 and r["done"] and r["error"] is None for r in results)
    metrics = replicas.metrics()
    per_replica = [successes(metrics, r) for r in (0, 1)]
    assert sum(per_replica) == 200 and min(per_replica) >= 50, per_replica
    health = replicas.health()
    assert [r["state"] for r in health["replicas"]] == ["serving", "serving"]


def test_a_killed_replica_hangs_nothing_and_comes_back(replicas):
    victim = replicas.health()["replicas"][0]["pid"]

    async def load_then_kill() -> list[dict]:
        texts = [prompt(1000 + i) for i in range(60)]
        task = asyncio.ensure_future(many_streams(replicas.base_url, texts))
        before = successes(replicas.metrics(), 0)
        assert await poll(lambda: False, timeout=0.5) is False  # let the load start
        os.kill(victim, signal.SIGKILL)  # mid-load: some requests streamed, some did not
        return await task, before

    results, _ = asyncio.run(load_then_kill())
    assert not [r for r in results if isinstance(r, BaseException)], results  # none hung
    finished = [r for r in results if r["finish_reason"] in ("length", "stop")]
    failed = [r for r in results if r["error"] is not None]
    assert len(finished) + len(failed) == len(results)
    assert all(r["done"] for r in results)  # every stream ended with [DONE]
    assert all(r["error"]["code"] in ("engine_error", "unavailable") for r in failed)
    assert len(finished) >= 30  # replica 1's and the retried ones
    assert wait_until(lambda: replicas.health()["replicas"][0]["restarts"] == 1, timeout=120)
    back = replicas.health()["replicas"][0]
    assert back["state"] == "serving" and back["pid"] != victim and back["last_error"]
    # the restarted replica takes traffic again
    again = asyncio.run(many_streams(replicas.base_url, [prompt(2000 + i) for i in range(40)]))
    assert all(r["finish_reason"] in ("length", "stop") and r["error"] is None for r in again)
    assert successes(replicas.metrics(), 0) > 0  # counted by the new actor
    assert metric_value(replicas.metrics(), "jaxpaged:replica_restarts_total", replica="0") == 1
