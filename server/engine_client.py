"""The seam between the HTTP handlers and whatever runs the requests.

The handlers need only this much of an engine: ``submit`` a request's prompts and iterate their
outputs, ``abort``, ``drain`` / ``end_streams`` on shutdown, the health and metrics answers, and
the lifetime hooks the app's lifespan calls. ``AsyncEngine`` (one ``LLMEngine`` on a thread of
this process) is one; ``jaxpaged.distributed.ReplicaEngine`` (N engine replicas as Ray actors
behind a router) is the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from jaxpaged.outputs import RequestOutput
from jaxpaged.server.async_engine import EngineInput
from jaxpaged.server.live_view import LiveView


class OutputStreamLike(Protocol):
    """The outputs of one HTTP request's engine requests (DELTA outputs, in step order).
    Iteration raises ``RequestFailedError`` / ``EngineUnavailableError``; ``close()`` aborts what
    has not finished."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def close(self) -> None: ...


class EngineClient(Protocol):
    live_view: LiveView | None  # the page's view of one engine's pool (None: not available)

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def stop(self, timeout: float | None = None) -> bool: ...

    def drain(self) -> None: ...

    def end_streams(self, message: str = ...) -> None: ...

    @property
    def is_accepting(self) -> bool: ...

    async def submit(self, inputs: list[EngineInput]) -> OutputStreamLike: ...

    async def health(self) -> tuple[bool, dict[str, Any] | None]:
        """(serving, body): 200 when serving; the body (None: empty) details the replicas."""
        ...

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition of every engine behind this client."""
        ...
