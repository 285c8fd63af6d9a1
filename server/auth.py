"""``Authorization: Bearer <key>`` on every route but the open ones (a pure ASGI middleware, so
streamed responses pass through untouched). The open ones: health, metrics, and the browser page
with its static files (the page asks for the key and sends it with each API call). Several keys
may be valid (vLLM's ``--api-key A B``); the header is compared with every one of them in
constant time."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from jaxpaged.server.errors import APIError

OPEN_PATHS = frozenset({"/health", "/metrics", "/"})
OPEN_PREFIX = "/static/"


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]):
        self.app = app
        self._expected = [f"Bearer {key}".encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (not self._expected or scope["type"] != "http"
                or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIX)
                or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                         code="invalid_api_key")
        await error.to_response()(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(given) != 1:
            return False
        # NOTE: no short cut: every key is compared, so the time does not tell which one matched
        matches = [hmac.compare_digest(given[0], key) for key in self._expected]
        return any(matches)
