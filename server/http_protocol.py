"""uvicorn's h11 protocol with a request-read deadline (uvicorn has none).

uvicorn closes a kept-alive connection once it idles ``timeout_keep_alive`` seconds after a
response, but a connection that opened and never sent a whole request (a half-open or slowloris
client) is held for ever, each one an open file descriptor. Here every request must arrive whole
(head and body) within ``read_timeout`` seconds of its first byte, or of the connection's opening
for the first request; otherwise the connection is closed (a request whose body stalls sees
``http.disconnect``, which the app logs as one line).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_READ_TIMEOUT_S = 30.0


def timed_h11_protocol(read_timeout: float) -> type[H11Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``."""
    if not read_timeout > 0:
        raise ValueError(f"--timeout-request-read must be positive, got {read_timeout}")
    return type("TimedH11Protocol", (_TimedH11Protocol,), {"read_timeout": read_timeout})


class _TimedH11Protocol(H11Protocol):
    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    _read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the whole request is in (or the connection is done)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.logger.info("closing a connection whose request did not arrive within %s s",
                             self.read_timeout)
            self.transport.close()
