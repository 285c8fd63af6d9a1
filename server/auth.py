"""``Authorization: Bearer <key>`` on every route but the open ones (a pure ASGI middleware, so
streamed responses pass through untouched)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from jaxpaged.server.errors import APIError

OPEN_PATHS = frozenset({"/health", "/metrics"})


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self._expected is None or scope["type"] != "http"
                or scope["path"] in OPEN_PATHS or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                         code="invalid_api_key")
        await error.to_response()(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        return len(given) == 1 and hmac.compare_digest(given[0], self._expected)
