"""``X-Request-Id``: every response carries one (a pure ASGI middleware).

The client's header is echoed as it came; otherwise the response carries the id the handler
chose (``request.state.request_id``: a generation request's vLLM ``request_id`` or its own), or a
fresh one. vLLM's rule for generation ids is header first, then the body's ``request_id``."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_SAFE = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII: a header value that cannot break HTTP


def incoming_request_id(scope: Scope) -> str | None:
    """The client's X-Request-Id header, when it is one header of safe characters."""
    given = [v for k, v in scope["headers"] if k == HEADER]
    if len(given) != 1:
        return None
    text = given[0].decode("latin-1")
    return text if _SAFE.fullmatch(text) else None


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = incoming_request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                chosen = state.get("request_id")
                value = chosen if chosen and _SAFE.fullmatch(chosen) else uuid.uuid4().hex
                message = {**message,
                           "headers": [*message.get("headers", []), (HEADER, value.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)
