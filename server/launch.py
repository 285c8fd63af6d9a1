"""Running the server: build the engine, then serve the app with uvicorn until SIGTERM/SIGINT.

On the first SIGTERM or SIGINT the server drains: new generation requests get 503, uvicorn stops
accepting connections and waits for the in-flight responses, then the app's lifespan stops the
engine thread and the process exits with status 0 (a second SIGINT forces the exit).

A request that arrives while draining is never run: it gets 503 when uvicorn still reads it (its
connection was busy), and otherwise its connection is refused (the listener is closed) or closed
unanswered (uvicorn closes idle connections, and the kernel resets ones still queued on the
closed listener). Clients see either as "not served".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable

import uvicorn

from jaxpaged.config import EngineConfig
from jaxpaged.distributed.options import ReplicaOptions
from jaxpaged.distributed.ray_import import import_ray
from jaxpaged.engine.llm_engine import LLMEngine

from jaxpaged.server.app import build_app, build_app_for
from jaxpaged.server.http_protocol import timed_h11_protocol
from jaxpaged.server.settings import ServerSettings
from jaxpaged.server.args import (engine_config_from_args, replica_options_from_args,
                                  resolve_model_dir, server_settings_from_args)

logger = logging.getLogger("jaxpaged.server")
CUT_NOTICE_S = 1.0  # streams are ended this long before the graceful shutdown time is over


class DrainingServer(uvicorn.Server):
    """uvicorn's server that also tells the app to refuse new work on the first exit signal,
    and logs the ready line with the bound address once it listens."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None],
                 end_streams: Callable[[], None] = lambda: None):
        super().__init__(config)
        self._on_exit = on_exit
        self._end_streams = end_streams

    async def _wait_tasks_to_complete(self) -> None:
        """uvicorn waits ``timeout_graceful_shutdown`` for the responses in flight, then cancels
        them mid-stream. Shortly before that, the engine ends every stream itself, so each one
        closes with an error event and [DONE] (a whole response with 503)."""
        grace = self.config.timeout_graceful_shutdown
        if grace is None:
            await super()._wait_tasks_to_complete()
            return
        try:
            async with asyncio.timeout(max(grace - min(CUT_NOTICE_S, grace / 2), 0.0)):
                await super()._wait_tasks_to_complete()
        except TimeoutError:
            logger.warning("the graceful shutdown time is almost over: ending the streams in "
                           "flight with an error event")
            self._end_streams()
            await super()._wait_tasks_to_complete()

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
    replicas = replica_options_from_args(args)
    if replicas.data_parallel_size > 1:  # before any model is fetched
        import_ray("--data-parallel-size above 1")
    model_dir = resolve_model_dir(args)
    settings = server_settings_from_args(args, model_dir)
    engine_config = engine_config_from_args(args, model_dir)
    if replicas.data_parallel_size > 1:
        return _run_replicas(args, engine_config, settings, replicas)
    app = build_app(LLMEngine(engine_config), settings)
    return _serve(args, app)


def _run_replicas(args: argparse.Namespace, engine_config: EngineConfig,
                  settings: ServerSettings, replicas: ReplicaOptions) -> int:
    """N engine replicas on Ray behind this server (``jaxpaged.distributed``)."""
    from jaxpaged.distributed.serve import build_replica_engine, init_ray

    ray = init_ray(replicas)
    try:
        client, facts = build_replica_engine(ray, engine_config, settings, replicas)
        return _serve(args, build_app_for(client, facts, settings))
    finally:
        ray.shutdown()


def _serve(args: argparse.Namespace, app) -> int:
    """uvicorn until the exit signal, with the graceful drain (module docstring)."""
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level or args.log_level,
                            access_log=not args.disable_access_log, lifespan="on",
                            timeout_graceful_shutdown=args.timeout_graceful_shutdown,
                            **connection_limits(args))
    server = DrainingServer(config, on_exit=app.state.context.engine.drain,
                            end_streams=app.state.context.engine.end_streams)
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
