"""The engine thread: one thread owns the ``LLMEngine`` (and so the accelerator); HTTP handlers
talk to it without polling.

::

    handler (event loop)                       engine thread
    ---------------------                      -------------
    submit(inputs) --_Add--> command list ---> between steps: engine.add_request(...)
         await admitted <--call_soon_threadsafe-- ok / ValueError / QueueFullError
    async for out in stream <--call_soon_threadsafe-- engine.step() -> DELTA RequestOutputs
    stream.close() --_Abort--> command list ---> engine.abort_request(...)  (blocks freed)
    end_streams() --_EndAll--> command list ---> abort all; streams end with an error event

The thread sleeps on a ``threading.Condition`` while there are no commands and no unfinished
requests, and loops ``engine.step()`` otherwise; commands are applied only between steps, so the
engine is never touched by two threads. Outputs of one step go to the event loop in one
``call_soon_threadsafe`` callback, which feeds each request's ``asyncio.Queue``. Between steps
the thread also feeds the page's live view (``live_view.py``): each step's time and batch, and at
most every ``LiveView.interval_s`` a snapshot of the pool that ``GET /engine/state`` serves.

A step that raises does not kill the thread: ``LLMEngine.recover`` aborts the requests the
failed step may have left half-updated, their streams get ``RequestFailedError`` (HTTP 500), and
the loop goes on with the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

from jaxpaged.engine.llm_engine import LLMEngine
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams
from jaxpaged.server.beam_search import beam_search_request_output
from jaxpaged.server.live_view import LiveView
from jaxpaged.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class EngineUnavailableError(RuntimeError):
    """The engine takes no new requests: the server is draining or the engine thread is gone
    (the server answers 503)."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class RequestFailedError(RuntimeError):
    """The engine failed while running this request (the server answers 500)."""

    def __init__(self, request_id: str, message: str):
        super().__init__(message)
        self.request_id = request_id


@dataclasses.dataclass(frozen=True)
class EngineInput:
    """One prompt for the engine, tokenized by the handler."""

    request_id: str
    prompt: str | None  # the text, when the prompt came as text (reported back, not re-tokenized)
    prompt_token_ids: list[int]
    params: SamplingParams  # output_kind DELTA: the stream carries what each step added
    arrival_time: float  # when the HTTP request was accepted (time.time())
    priority: int = 0  # lower first under the "priority" scheduling policy
    cache_salt: str | None = None  # separates the request's prefix-cache entries
    beam_search: BeamSearchParams | None = None  # use_beam_search: one final output, n beams


class OutputStream:
    """The outputs of one HTTP request's engine requests, in step order (event loop side).

    ``async for output in stream`` ends once every request finished; an engine failure is raised
    from the iteration. ``close()`` aborts whatever has not finished (idempotent)."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]):
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._unfinished = set(request_ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._unfinished.discard(getattr(item, "request_id", None))
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    def close(self) -> None:
        if self._unfinished:
            self._engine.abort(sorted(self._unfinished))
            self._unfinished.clear()


@dataclasses.dataclass
class _Add:
    inputs: list[EngineInput]
    stream: OutputStream
    admitted: asyncio.Future  # resolved with None, or the add_request error


@dataclasses.dataclass
class _Abort:
    request_ids: list[str]


@dataclasses.dataclass
class _EndAll:
    """Abort every live request; each stream ends with ``error`` (shutdown's last resort)."""

    error: EngineUnavailableError


# (target, value): a stream gets an output or an error; an admission future gets None or an error.
_Delivery = tuple[OutputStream | asyncio.Future, Any]


class AsyncEngine:
    """Runs an ``LLMEngine`` on its own thread for asyncio handlers (see the module docstring)."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None,
                 live_view: LiveView | None = None):
        self.engine = engine
        self._metrics = metrics
        self.live_view = live_view  # fed by the engine thread only
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._closed_error: BaseException | None = None  # set (under _cond) when the thread ends
        self._draining = False
        self._streams: dict[str, OutputStream] = {}  # engine thread only: live request -> stream
        # engine thread only: live beam search -> its prompt (text, ids), for its final output
        self._beam_prompts: dict[str, tuple[str | None, list[int]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ----- event loop side -----

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="jaxpaged-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Refuse new requests from now on (in-flight ones go on)."""
        self._draining = True

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._closed_error is None

    @property
    def is_accepting(self) -> bool:
        """Running and not draining: new requests are welcome (what /health reports)."""
        return self.is_running and not self._draining

    async def health(self) -> tuple[bool, dict[str, Any] | None]:
        """(accepting, no body): /health answers 200 or 503 with an empty body."""
        return self.is_accepting, None

    async def metrics_text(self) -> bytes:
        return self._metrics.render() if self._metrics is not None else b""

    async def submit(self, inputs: list[EngineInput]) -> OutputStream:
        """Queue the prompts of one HTTP request, all or none.

        Raises what ``LLMEngine.add_request`` raises (ValueError, QueueFullError), or
        EngineUnavailableError while draining or after the engine thread ended."""
        if self._draining:
            raise EngineUnavailableError("the server is shutting down")
        stream = OutputStream(self, [i.request_id for i in inputs])
        admitted = self._loop.create_future()
        self._post(_Add(inputs, stream, admitted))
        try:
            await admitted
        except asyncio.CancelledError:
            stream.close()
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        self._post(_Abort(list(request_ids)))

    def end_streams(self, message: str = "the server is shutting down") -> None:
        """Abort every live request now: its stream ends with an error event and [DONE] (a
        whole response with 503), instead of being cut when shutdown's grace time is over."""
        self._post(_EndAll(EngineUnavailableError(message)))

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread: requests still running are aborted. Waits at most ``timeout``
        seconds (None: until it ended); True when the thread ended. A thread stuck inside a step
        is left behind (it is a daemon thread, so the process can still exit)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("the engine thread did not stop within %s s; leaving it behind", timeout)
            return False
        return True

    def _post(self, command: _Add | _Abort) -> None:
        with self._cond:
            if self._closed_error is None:
                self._commands.append(command)
                self._cond.notify()
                return
        if isinstance(command, _Add):
            command.admitted.set_exception(EngineUnavailableError(str(self._closed_error)))

    # ----- engine thread -----

    def _run(self) -> None:
        try:
            self._publish_view(force=True)
            while self._run_once():
                pass
        except BaseException as e:  # a bug outside a step: fail everything, stay answerable
            logger.exception("the engine thread failed")
            self._close(EngineUnavailableError(f"the engine stopped: {type(e).__name__}: {e}"))
        else:
            self._close(EngineUnavailableError("the server is shutting down"))

    def _run_once(self) -> bool:
        with self._cond:
            while not (self._commands or self._stopping
                       or self.engine.has_unfinished_requests()):
                self._cond.wait()
            if self._stopping:
                return False
            commands, self._commands = self._commands, []
        for command in commands:
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _EndAll):
                self._end_all(command.error)
            else:
                self._abort(command.request_ids)
        if self.engine.has_unfinished_requests():
            self._step()
        if self._metrics is not None:
            self._metrics.observe_step(self.engine.scheduler.make_stats())
        # NOTE: forced when idle, so the view's last snapshot shows the pool after the last step
        self._publish_view(force=not self.engine.has_unfinished_requests())
        return True

    def _publish_view(self, force: bool) -> None:
        if self.live_view is not None:
            self.live_view.maybe_publish(self.engine.scheduler, time.time(), force=force)

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        try:
            for i in command.inputs:
                if i.beam_search is not None:
                    self.engine.add_beam_search(i.request_id, i.prompt, i.beam_search,
                                                prompt_token_ids=i.prompt_token_ids,
                                                priority=i.priority, cache_salt=i.cache_salt)
                    self._beam_prompts[i.request_id] = (i.prompt, i.prompt_token_ids)
                else:
                    self.engine.add_request(i.request_id, i.prompt, i.params,
                                            prompt_token_ids=i.prompt_token_ids,
                                            arrival_time=i.arrival_time, priority=i.priority,
                                            cache_salt=i.cache_salt)
                added.append(i.request_id)
        except Exception as e:  # bad input (ValueError), queue full, or a bug: nothing stays queued
            self.engine.abort_request(added)
            self._deliver([(command.admitted, e)])
            return
        for i in command.inputs:
            self._streams[i.request_id] = command.stream
            if self._metrics is not None:
                self._metrics.observe_admission(i.request_id, i.arrival_time)
        self._deliver([(command.admitted, None)])

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)
        for request_id in request_ids:
            self._beam_prompts.pop(request_id, None)
        for request_id in request_ids:
            if self._streams.pop(request_id, None) is not None and self._metrics is not None:
                self._metrics.observe_abort(request_id)

    def _step(self) -> None:
        try:
            start = time.perf_counter()
            outputs = self.engine.step()
            self._record_step(time.perf_counter() - start, outputs)
            for request_id, result in self.engine.take_beam_search_outputs().items():
                prompt, prompt_token_ids = self._beam_prompts.pop(request_id)
                outputs.append(beam_search_request_output(request_id, prompt, prompt_token_ids,
                                                          result))
        except Exception as e:
            logger.exception("an engine step failed; failing its requests")
            self._fail(self.engine.recover(set(self._streams), e), e)
            return
        if (not outputs and not self.engine.scheduler.has_unfinished_requests()
                and not self.engine.beam_search.groups):
            # NOTE: the engine tracks requests its scheduler lost; nothing would ever finish them
            # and this loop would spin. Never seen; fail them rather than burn a core.
            lost = RuntimeError("the scheduler lost these requests")
            logger.error("%s", lost)
            self._fail(self.engine.recover(set(self._streams)), lost)
            return
        now = time.time()
        deliveries: list[_Delivery] = []
        for output in outputs:
            stream = (self._streams.pop(output.request_id, None) if output.finished
                      else self._streams.get(output.request_id))
            if self._metrics is not None:
                self._metrics.observe_output(output, now)
            if stream is not None:
                deliveries.append((stream, output))
        self._deliver(deliveries)

    def _record_step(self, step_s: float, outputs: list[RequestOutput]) -> None:
        """The step's time and batch (the requests running after it plus those it finished)
        into the live view's history."""
        if self.live_view is not None:
            batch = len(self.engine.scheduler.running) + sum(o.finished for o in outputs)
            self.live_view.record_step(time.time(), step_s, batch)

    def _fail(self, request_ids: set[str], error: Exception) -> None:
        message = f"the engine failed while running this request ({type(error).__name__}: {error})"
        deliveries: list[_Delivery] = []
        for request_id in sorted(request_ids):
            stream = self._streams.pop(request_id, None)
            if self._metrics is not None:
                self._metrics.observe_failure(request_id)
            if stream is not None:
                deliveries.append((stream, RequestFailedError(request_id, message)))
        self._deliver(deliveries)

    def _close(self, error: EngineUnavailableError) -> None:
        """The thread is ending: fail every pending admission and live stream with ``error``."""
        with self._cond:
            self._closed_error = error
            commands, self._commands = self._commands, []
        self._deliver([(c.admitted, error) for c in commands if isinstance(c, _Add)])
        self._end_all(error)

    def _end_all(self, error: EngineUnavailableError) -> None:
        """Abort every live request; its stream gets ``error``."""
        deliveries: list[_Delivery] = []
        try:
            self.engine.abort_request(list(self._streams))
        except Exception:
            logger.exception("aborting the remaining requests failed")
        for request_id, stream in self._streams.items():
            deliveries.append((stream, EngineUnavailableError(str(error), request_id)))
            if self._metrics is not None:
                self._metrics.observe_abort(request_id)
        self._streams.clear()
        self._deliver(deliveries)

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        if not deliveries:
            return
        try:
            self._loop.call_soon_threadsafe(_deliver_on_loop, deliveries)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _deliver_on_loop(deliveries: list[_Delivery]) -> None:
    for target, value in deliveries:
        if isinstance(target, OutputStream):
            target.put(value)
        elif not target.done():  # an admission whose handler may have been cancelled
            if value is None:
                target.set_result(None)
            else:
                target.set_exception(value)
