"""Who may talk to the server from a browser: the Host header and the Origin header (a pure ASGI
middleware, before auth).

A keyless server on loopback is reachable by any web page the user opens: the page can POST to
``http://127.0.0.1:8000`` without a CORS preflight when the body is not typed JSON (the server
answers 415 then, ``json_body.py``), and a DNS-rebinding page reaches it under its own host name.
So:

- ``allowed_hosts``: the Host header's name must be one of them (400 otherwise, Starlette's
  ``TrustedHostMiddleware`` rule); ``None`` allows any. The command line defaults it to the
  loopback names when the server binds a loopback address (``--allowed-hosts``).
- ``allowed_origins``: a request carrying an ``Origin`` header (browsers add it to cross-site
  requests) must come from one of them, or from a page served under an allowed host name (403
  otherwise); ``"*"`` allows every origin. The allowed origins also get CORS answers
  (``--allowed-origins``, vLLM's flag; vLLM's default allows every origin, jaxpaged's none).
  A same-origin request (the Origin's host:port is the Host header, as the calls of the page at
  ``GET /`` are) is always allowed: the Host check covers it.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

from starlette.types import ASGIApp, Receive, Scope, Send

from jaxpaged.server.errors import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` listens on loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name of a Host header value (``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class OriginGuardMiddleware:
    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] | None,
                 allowed_origins: tuple[str, ...]):
        self.app = app
        self._hosts = None if allowed_hosts is None or "*" in allowed_hosts else frozenset(
            host_name(h) for h in allowed_hosts)
        self._any_origin = "*" in allowed_origins
        self._origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> APIError | None:
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"host", b"origin")}
        if self._hosts is not None and host_name(headers.get("host", "")) not in self._hosts:
            return APIError(400, "invalid host header (--allowed-hosts)", code="invalid_host")
        origin = headers.get("origin")
        if origin is None or self._origin_allowed(origin, headers.get("host", "")):
            return None
        return APIError(403, f"requests from the origin {origin[:100]!r} are not allowed "
                             "(--allowed-origins)", code="origin_not_allowed")

    def _origin_allowed(self, origin: str, host: str) -> bool:
        if self._any_origin or origin.rstrip("/").lower() in self._origins:
            return True
        if host and urllib.parse.urlsplit(origin.lower()).netloc == host.strip().lower():
            return True  # same origin
        name = urllib.parse.urlsplit(origin).hostname
        return self._hosts is not None and name is not None and name in self._hosts
