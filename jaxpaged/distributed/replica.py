"""One engine replica: an ``LLMEngine`` on its engine thread inside a Ray actor.

The actor class is plain Python; ``serve.py`` wraps it with ``ray.remote`` and the replica's
resources (``tensor_parallel_size`` GPUs: Ray sets ``CUDA_VISIBLE_DEVICES`` and JAX sees only
those). Inside, the replica runs the same ``AsyncEngine`` as the single-engine server, on the
actor's event loop, with its own ``ServerMetrics``.

``generate`` is a streaming generator (``num_returns="streaming"``): it yields
``ReplicaAdmitted`` (or one ``ReplicaFailure``), then the requests' DELTA ``RequestOutput``s as
the engine makes them, and a ``ReplicaFailure`` if the engine fails them. The front end cancels
the generator (``ray.cancel``) when its client goes away; the cancellation closes the stream,
which aborts the requests and frees their blocks.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from jaxpaged.config import EngineConfig
from jaxpaged.engine.llm_engine import LLMEngine
from jaxpaged.outputs import RequestOutput
from jaxpaged.server.async_engine import AsyncEngine, EngineInput
from jaxpaged.server.engine_facts import EngineFacts
from jaxpaged.server.metrics import ServerMetrics

from jaxpaged.distributed.replica_protocol import ReplicaAdmitted, ReplicaFailure


class EngineReplica:
    """The actor's body (see the module docstring)."""

    def __init__(self, config: EngineConfig, model_name: str, index: int):
        self._index = index
        self._engine = LLMEngine(config)
        self._metrics = ServerMetrics(model_name)
        self._async = AsyncEngine(self._engine, self._metrics)
        self._started = False

    def _start_once(self) -> None:
        """The engine thread delivers to the actor's event loop, known only inside a call."""
        if not self._started:
            self._async.start(asyncio.get_running_loop())
            self._started = True

    async def facts(self) -> EngineFacts:
        """What the front end needs to know (also the readiness probe)."""
        self._start_once()
        return EngineFacts.of(self._engine)

    async def pid(self) -> int:
        """The actor's process id (reported by /health)."""
        return os.getpid()

    async def ping(self) -> bool:
        """Liveness: the engine thread runs and takes requests."""
        self._start_once()
        return self._async.is_accepting

    async def generate(self, inputs: list[EngineInput]
                       ) -> AsyncIterator[ReplicaAdmitted | ReplicaFailure | RequestOutput]:
        self._start_once()
        try:
            stream = await self._async.submit(inputs)
        except Exception as e:  # bad input, queue full, engine gone: the front end maps it
            yield ReplicaFailure.of(e)
            return
        yield ReplicaAdmitted(self._index)
        try:
            async for output in stream:
                yield output
        except Exception as e:  # RequestFailedError, EngineUnavailableError
            yield ReplicaFailure.of(e)
        finally:
            stream.close()  # also on cancellation: aborts what has not finished

    async def metrics_text(self) -> bytes:
        return self._metrics.render()

    async def end_streams(self, message: str) -> None:
        self._async.end_streams(message)

    async def kv_pool_is_full(self) -> bool:
        """Every allocatable KV block is free (tests: aborted requests gave theirs back)."""
        blocks = self._engine.scheduler.block_manager
        return blocks.num_free_blocks == blocks.num_blocks - 1
