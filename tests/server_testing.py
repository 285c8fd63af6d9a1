"""Helpers for the server tests: a real uvicorn server on a free loopback port, in a thread.

Each test module starts one server (engine start-up is the slow part) through ``start_server``
and stops it at the end. The server runs the real app, the real engine thread and the real tiny
model; tests reach the engine through ``RunningServer.engine`` only to check the block pool or
to inject failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import threading
import time
from collections.abc import Callable, Iterator

import uvicorn
from starlette.applications import Starlette

from jaxpaged.engine.llm_engine import LLMEngine
from jaxpaged.config import EngineConfig
from jaxpaged.server.app import build_app
from jaxpaged.server.async_engine import AsyncEngine
from jaxpaged.server.settings import ServerSettings


MODEL = "llama3-rope"
MODEL_NAME = "tiny"
API_KEY = "sk-test-key"
# The tests' HTTP read timeout: a first request compiles its step shapes (CPU: on first use),
# seconds alone but minutes on a CI machine busy with a parallel worker. It only bounds how long
# a hang takes to fail.
CLIENT_TIMEOUT_S = 300


def engine_config(model_dir: pathlib.Path, **overrides) -> EngineConfig:
    """Small limits: 128-token context, 8 sequences, 63 usable blocks of 16 tokens."""
    args = dict(dtype="float32", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
                num_gpu_blocks_override=64, seed=0)
    return EngineConfig(model=str(model_dir), **{**args, **overrides})


@dataclasses.dataclass
class RunningServer:
    base_url: str
    engine: LLMEngine
    async_engine: AsyncEngine
    app: Starlette
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop")

    def pool_is_full(self) -> bool:
        """Every allocatable KV block is free (block 0 is the null block)."""
        block_manager = self.engine.scheduler.block_manager
        return block_manager.num_free_blocks == block_manager.num_blocks - 1


def start_server(config: EngineConfig, step_hook=None, **settings) -> RunningServer:
    """Builds the engine and serves it; ``settings``: ServerSettings fields (the served model
    name defaults to MODEL_NAME); ``step_hook``: the engine's fault-injection hook."""
    engine = LLMEngine(config, step_hook=step_hook)
    settings.setdefault("served_model_names", (MODEL_NAME,))
    app = build_app(engine, ServerSettings(**settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), timeout=60)
    if not server.started:
        raise RuntimeError("the test server did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(f"http://127.0.0.1:{port}", engine, app.state.context.engine, app,
                         server, thread)


@contextlib.contextmanager
def server_logs(caplog, level: int = logging.INFO) -> Iterator[None]:
    """caplog also receives uvicorn's records (its "uvicorn" logger does not propagate to the
    root, so an "Exception in ASGI application" would otherwise pass unseen)."""
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(level):
            yield
    finally:
        uvicorn_logger.removeHandler(caplog.handler)


def wait_until(predicate: Callable[[], bool], timeout: float = CLIENT_TIMEOUT_S,
               interval: float = 0.02) -> bool:
    """Polls ``predicate`` until it holds or ``timeout`` seconds passed; returns its last value.
    The default bound is generous: the engine applies an abort between steps, and a step that
    compiles a new shape takes minutes on a busy CI machine."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(interval)
    return True


async def poll(predicate: Callable[[], bool], timeout: float = CLIENT_TIMEOUT_S) -> bool:
    """``wait_until`` for coroutines: awaits (not blocks) between checks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0.0 when absent)."""
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            return float(value)
    return 0.0
