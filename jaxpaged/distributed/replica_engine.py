"""The front end's engine client over N Ray replicas (``server/engine_client.py``'s seam).

::

    handler (event loop)                      replica actor i
    ---------------------                     ---------------
    submit(inputs) -- Router.place --------> generate(inputs)   (streaming generator)
        await first item  <-----------------  ReplicaAdmitted | ReplicaFailure
    async for out in ReplicaStream <--------  RequestOutput ... (DELTA, as the engine steps)
    stream.close() -- ray.cancel ----------->  the generator's stream closes: requests aborted

A replica that dies (Ray's actor errors on a call, or a failed ping) is reported to the
supervisor, which restarts it. A request whose replica died before it streamed anything is sent
again to another serving replica (at most once per replica); one that already streamed ends
with ``RequestFailedError`` (HTTP 500, or an error event and [DONE] in a stream). When no
replica serves, submissions get ``EngineUnavailableError`` (503). Nothing waits forever: every
wait is on a Ray call that fails when its actor dies.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from jaxpaged.outputs import RequestOutput
from jaxpaged.server.async_engine import EngineInput, EngineUnavailableError, RequestFailedError

from jaxpaged.distributed.metrics import FrontEndMetrics, merge_replica_metrics
from jaxpaged.distributed.replica_protocol import ReplicaAdmitted, ReplicaFailure
from jaxpaged.distributed.router import Router
from jaxpaged.distributed.supervisor import ReplicaSupervisor

logger = logging.getLogger(__name__)

METRICS_TIMEOUT_S = 10.0  # a replica that does not answer a scrape in time is left out of it


class _ReplicaGone(Exception):
    """The replica behind a stream died or became unreachable."""


class ReplicaEngine:
    # The page's live view draws one engine's block pool; behind replicas there are N pools and
    # GET /engine/state answers 503 (the page shows the chat without the view).
    live_view = None

    def __init__(self, ray, supervisor: ReplicaSupervisor, router: Router,
                 metrics: FrontEndMetrics, max_model_len: int):
        self.ray = ray
        self.supervisor = supervisor
        self.router = router
        self.metrics = metrics
        self._max_model_len = max_model_len
        self._draining = False
        self._running = False

    # ----- lifetime -----

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._running = True
        self.supervisor.watch(loop, on_restarted=self._restarted)

    def stop(self, timeout: float | None = None) -> bool:
        self._running = False
        self.supervisor.stop()
        return True

    def drain(self) -> None:
        self._draining = True

    def end_streams(self, message: str = "the server is shutting down") -> None:
        for slot in self.supervisor.slots:
            if slot.state == "serving":
                slot.handle.end_streams.remote(message)

    @property
    def is_accepting(self) -> bool:
        return self._running and not self._draining and bool(self.supervisor.serving())

    async def health(self) -> tuple[bool, dict[str, Any]]:
        return self.is_accepting, {"replicas": [s.report() for s in self.supervisor.slots]}

    async def metrics_text(self) -> bytes:
        slots = [s for s in self.supervisor.slots if s.state == "serving"]
        texts = await asyncio.gather(*(self._scrape(s.handle) for s in slots))
        return merge_replica_metrics(
            [(s.index, t) for s, t in zip(slots, texts) if t is not None], self.metrics.registry)

    async def _scrape(self, handle) -> bytes | None:
        try:
            async with asyncio.timeout(METRICS_TIMEOUT_S):
                return await handle.metrics_text.remote()
        except Exception:  # dead or stuck: the supervisor's ping finds out
            return None

    def _restarted(self, index: int) -> None:
        self.metrics.restarts[index].inc()

    # ----- requests -----

    async def submit(self, inputs: list[EngineInput]) -> ReplicaStream:
        """Route, send, wait for the admission. Raises what the replica's engine raised
        (ValueError, QueueFullError) or EngineUnavailableError."""
        if self._draining:
            raise EngineUnavailableError("the server is shutting down")
        stream = ReplicaStream(self, inputs)
        await stream.dispatch()
        return stream

    def cost(self, inputs: list[EngineInput]) -> int:
        """Tokens a request may still cost: prompts plus the most each sample may generate."""
        total = 0
        for i in inputs:
            prompt = len(i.prompt_token_ids)
            if i.beam_search is not None:
                total += prompt + i.beam_search.max_tokens * i.beam_search.beam_width
                continue
            most = i.params.max_tokens or max(self._max_model_len - prompt, 0)
            total += prompt + most * i.params.n
        return total


class ReplicaStream:
    """One HTTP request's outputs from its replica (``OutputStreamLike``)."""

    def __init__(self, engine: ReplicaEngine, inputs: list[EngineInput]):
        self._engine = engine
        self._inputs = inputs
        self._unfinished = {i.request_id for i in inputs}
        self._tried: set[int] = set()
        self._streamed = False  # an output went to the handler: no retry from here on
        self._replica: int | None = None
        self._handle: Any = None
        self._generator: Any = None
        self._charged = 0  # outstanding tokens charged to the replica

    async def dispatch(self) -> None:
        """Send the request to a replica and wait for its admission; retry elsewhere while
        replicas die under it."""
        engine = self._engine
        first = self._inputs[0]
        while True:
            serving = [r for r in engine.supervisor.serving() if r not in self._tried]
            placement = engine.router.place(first.prompt_token_ids, engine.cost(self._inputs),
                                             serving, first.cache_salt)
            if placement is None:
                raise EngineUnavailableError("no engine replica is serving" + (
                    " (the ones tried died)" if self._tried else ""))
            self._tried.add(placement.replica)
            self._replica, self._charged = placement.replica, placement.tokens
            self._handle = engine.supervisor.handle(placement.replica)
            engine.metrics.routed[placement.replica].inc()
            self._generator = self._handle.generate.options(
                num_returns="streaming").remote(self._inputs)
            try:
                item = await self._next_item()
            except _ReplicaGone:
                self._release()
                engine.metrics.retried.inc()
                continue
            except BaseException:
                self.close()
                raise
            if isinstance(item, ReplicaFailure):
                self._release()
                raise item.to_exception()
            if not isinstance(item, ReplicaAdmitted):
                self.close()
                raise RuntimeError(f"replica {self._replica} answered {item!r} before admitting")
            return

    async def _next_item(self) -> Any:
        """The generator's next item; _ReplicaGone when the replica died, StopAsyncIteration
        when the generator ended."""
        exceptions = self._engine.ray.exceptions
        try:
            ref = await self._generator.__anext__()
            return await ref
        except StopAsyncIteration:
            raise
        except exceptions.RayTaskError as e:  # the replica's code raised: this request failed
            raise RequestFailedError(self._first_id(),
                                     f"replica {self._replica} failed: {e}") from None
        except (exceptions.RayError, ConnectionError) as e:  # the actor is dead or unreachable
            self._engine.supervisor.report_dead(self._replica, self._handle, e)
            self._engine.router.forget(self._replica)
            raise _ReplicaGone(str(e)) from None

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while self._unfinished:
            try:
                item = await self._next_item()
            except _ReplicaGone:
                await self._retry_or_fail()
                continue
            except StopAsyncIteration:
                self._end()
                raise RequestFailedError(self._first_id(), f"replica {self._replica} ended the "
                                         "stream before the requests finished") from None
            except BaseException:  # cancelled (the client left) or a bug: abort at the replica
                self.close()
                raise
            if isinstance(item, ReplicaFailure):
                self._end()
                raise item.to_exception()
            self._streamed = True
            self._consume(item)
            return item
        self._end()
        raise StopAsyncIteration

    async def _retry_or_fail(self) -> None:
        """The replica died under this request: start over on another one if nothing was
        streamed yet, else fail (RequestFailedError, or EngineUnavailableError when no other
        replica serves)."""
        if self._streamed:
            self._end()
            raise RequestFailedError(self._first_id(), f"engine replica {self._replica} died "
                                     "while running this request")
        self._release()
        self._engine.metrics.retried.inc()
        try:
            await self.dispatch()
        except EngineUnavailableError:
            self._end()
            raise
        except Exception as e:  # e.g. the other replica's queue is full
            self._end()
            raise RequestFailedError(self._first_id(), f"engine replica {self._replica} died "
                                     f"and no other replica took the request: {e}") from None

    def _first_id(self) -> str:
        return min(i.request_id for i in self._inputs)

    def _consume(self, output: RequestOutput) -> None:
        generated = sum(len(seq.token_ids) for seq in output.outputs)
        done = min(generated, self._charged)
        self._engine.router.release(self._replica, done)
        self._charged -= done
        if output.finished:
            self._unfinished.discard(output.request_id)

    def close(self) -> None:
        """Abort what has not finished: cancelling the generator closes the replica's stream."""
        if self._generator is not None and self._unfinished:
            try:
                self._engine.ray.cancel(self._generator)
            except Exception:  # the replica is gone already
                pass
        self._end()

    def _end(self) -> None:
        self._unfinished.clear()
        self._release()

    def _release(self) -> None:
        if self._replica is not None and self._charged:
            self._engine.router.release(self._replica, self._charged)
        self._charged = 0
