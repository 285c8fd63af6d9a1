"""The last line of defence (a pure ASGI middleware inside ``RequestIdMiddleware``, so even a
500 carries the request's X-Request-Id):

- a client that disconnects at any point (while its body is read, while its answer is sent)
  is one INFO line, not an ASGI traceback;
- a bug is logged with its traceback and answered with OpenAI's error JSON (500) when the
  response has not started yet; the message names no Python internals.
"""

from __future__ import annotations

import logging

import anyio
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxpaged.server.errors import APIError

logger = logging.getLogger("jaxpaged.server")

# What a vanished client raises, depending on where it was left.
CLIENT_GONE = (ClientDisconnect, ConnectionError, anyio.BrokenResourceError,
               anyio.ClosedResourceError, anyio.EndOfStream)


class ErrorBoundaryMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except CLIENT_GONE:
            logger.info("client disconnected: %s %s (request id %s)", scope.get("method"),
                        scope.get("path"), scope.get("state", {}).get("request_id"))
        except Exception:
            logger.exception("internal error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                error = APIError(500, "internal server error", code="internal_error")
                try:
                    await error.to_response()(scope, receive, send)
                except CLIENT_GONE:
                    pass
