"""The Starlette app: routes, error handlers, auth, and the engine thread's lifetime.

``build_app(engine, settings)`` wraps an already built ``LLMEngine``; the app starts the engine
thread when uvicorn starts it (lifespan) and stops it when uvicorn shuts down, after the
in-flight requests have drained. ``build_app_for(client, facts, settings)`` serves any engine
client the same way (Ray replicas: ``jaxpaged.distributed``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jaxpaged.engine.llm_engine import LLMEngine
from jaxpaged.engine.tokenizer import TokenTexts, load_tokenizer

from jaxpaged.server.async_engine import AsyncEngine
from jaxpaged.server.auth import BearerAuthMiddleware
from jaxpaged.server.context import ServerContext
from jaxpaged.server.engine_client import EngineClient
from jaxpaged.server.engine_facts import EngineFacts
from jaxpaged.server.endpoints import (detokenize, health, list_models, metrics_endpoint,
                                       retrieve_model, tokenize, version)
from jaxpaged.server.error_boundary import ErrorBoundaryMiddleware
from jaxpaged.server.errors import APIError
from jaxpaged.server.generation import create_chat_completion, create_completion
from jaxpaged.server.generation_defaults import generation_defaults
from jaxpaged.server.host_work import HostWorkPool
from jaxpaged.server.live_view import LiveView
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.origins import OriginGuardMiddleware
from jaxpaged.server.request_id import RequestIdMiddleware
from jaxpaged.server.settings import ServerSettings
from jaxpaged.server.ui import ui_routes

if TYPE_CHECKING:  # transformers loads only when a tokenizer does
    from transformers import PreTrainedTokenizerBase

# How long shutdown waits for the engine thread to finish its step and end; a thread stuck
# longer is left behind so that the process always exits.
ENGINE_STOP_TIMEOUT_S = 30.0


def build_app(engine: LLMEngine, settings: ServerSettings) -> Starlette:
    """The app over one in-process engine (its thread starts with the app)."""
    metrics = ServerMetrics(settings.served_model_names[0])
    return build_app_for(AsyncEngine(engine, metrics, LiveView()), EngineFacts.of(engine),
                         settings, metrics=metrics)


def build_app_for(client: EngineClient, facts: EngineFacts, settings: ServerSettings, *,
                  metrics: ServerMetrics | None = None) -> Starlette:
    """The app over any engine client (``server/engine_client.py``): the in-process engine
    thread, or Ray replicas behind a router (``jaxpaged.distributed``)."""
    tokenizer = _own_tokenizer(facts)
    context = ServerContext(
        host_work=HostWorkPool(lambda: _own_tokenizer(facts)),
        max_prompt_chars=max_prompt_chars(tokenizer, facts.max_model_len),
        settings=settings, engine=client, tokenizer=tokenizer,
        token_texts=TokenTexts(tokenizer), metrics=metrics, max_model_len=facts.max_model_len,
        vocab_size=facts.vocab_size, max_num_seqs=facts.max_num_seqs,
        max_logprobs=facts.max_logprobs, scheduling_policy=facts.scheduling_policy,
        generation_defaults=generation_defaults(facts.diff_sampling_param,
                                                caps_max_tokens=facts.caps_max_tokens))
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        *ui_routes(),
    ]
    app = Starlette(
        routes=routes, lifespan=_lifespan,
        middleware=[Middleware(RequestIdMiddleware), Middleware(ErrorBoundaryMiddleware),
                    Middleware(OriginGuardMiddleware, allowed_hosts=settings.allowed_hosts,
                               allowed_origins=settings.allowed_origins),
                    *_cors(settings),
                    Middleware(BearerAuthMiddleware, api_keys=settings.api_keys)],
        exception_handlers={APIError: _api_error, HTTPException: _http_error})
    # NOTE: Starlette's slash redirect builds its Location from the Host header (an open
    # redirect to any host); /v1/completions/ is a 404 instead.
    app.router.redirect_slashes = False
    app.state.context = context
    return app


def max_prompt_chars(tokenizer: PreTrainedTokenizerBase | None, max_model_len: int) -> int:
    """Characters beyond which a text cannot fit ``max_model_len`` tokens: no token spells more
    characters than the vocabulary's longest entry (byte-level entries spell one byte per
    character), with a factor 2 for normalizers that merge characters. A longer text is refused
    before it is tokenized."""
    if tokenizer is None:
        return 0
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_model_len * max(longest, 1) * 2


def _cors(settings: ServerSettings) -> list[Middleware]:
    """CORS answers (preflights included) for the allowed origins only."""
    if not settings.allowed_origins:
        return []
    return [Middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                       allow_methods=["GET", "POST"], allow_headers=["*"])]


def _own_tokenizer(facts: EngineFacts) -> PreTrainedTokenizerBase | None:
    if facts.tokenizer_dir is None:
        return None
    return load_tokenizer(facts.tokenizer_dir)


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette):
    engine = app.state.context.engine
    engine.start(asyncio.get_running_loop())
    try:
        yield
    finally:
        app.state.context.host_work.shutdown()
        await asyncio.to_thread(engine.stop, ENGINE_STOP_TIMEOUT_S)


# ----- errors -----

async def _api_error(request: Request, exc: Exception) -> Response:
    return exc.to_response()


async def _http_error(request: Request, exc: Exception) -> Response:
    return APIError(exc.status_code, str(exc.detail), code="not_found"
                    if exc.status_code == 404 else None).to_response()

