"""Running the server: build the engine, then serve the app with uvicorn until SIGTERM/SIGINT.

On the first SIGTERM or SIGINT the server drains: new generation requests get 503, uvicorn stops
accepting connections and waits for the in-flight responses, then the app's lifespan stops the
engine thread and the process exits with status 0 (a second SIGINT forces the exit).
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Callable

import uvicorn

from jaxpaged.engine.llm_engine import LLMEngine

from jaxpaged.server.app import build_app
from jaxpaged.server.http_protocol import timed_h11_protocol
from jaxpaged.server.args import (engine_config_from_args, resolve_model_dir,
                                  server_settings_from_args)

logger = logging.getLogger("jaxpaged.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server that also tells the app to refuse new work on the first exit signal,
    and logs the ready line with the bound address once it listens."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            logger.info("jaxpaged server ready at %s (OpenAI API under /v1)", self.url)

    @property
    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def run_server(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level.upper())
    model_dir = resolve_model_dir(args)
    settings = server_settings_from_args(args, model_dir)
    engine = LLMEngine(engine_config_from_args(args, model_dir))
    app = build_app(engine, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level or args.log_level,
                            access_log=not args.disable_access_log, lifespan="on",
                            timeout_graceful_shutdown=args.timeout_graceful_shutdown,
                            **connection_limits(args))
    server = DrainingServer(config, on_exit=app.state.context.engine.drain)
    # uvicorn re-raises the exit signal to the previous handler once it has shut down; a no-op
    # handler here turns that into a clean return (exit status 0) after the graceful drain.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _already_handled)
    server.run()
    return 0 if server.started else 1


def connection_limits(args: argparse.Namespace) -> dict:
    """uvicorn's connection guards: idle kept-alive connections close after
    ``--timeout-keep-alive``; a request must arrive whole within ``--timeout-request-read``
    (``http_protocol.py``); beyond ``--limit-concurrency`` connections or tasks new requests get
    503."""
    return {"timeout_keep_alive": args.timeout_keep_alive,
            "limit_concurrency": args.limit_concurrency,
            "http": timed_h11_protocol(args.timeout_request_read)}


def _configure_logging(level: str) -> None:
    """jaxpaged's own log lines (engine start-up, the ready line, step failures) to stderr."""
    root = logging.getLogger("jaxpaged")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False


def _already_handled(sig, frame) -> None:
    """The exit signal was handled by uvicorn's graceful shutdown."""
