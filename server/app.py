"""The Starlette app: routes, error handlers, auth, and the engine thread's lifetime.

``build_app(engine, settings)`` wraps an already built ``LLMEngine``; the app starts the engine
thread when uvicorn starts it (lifespan) and stops it when uvicorn shuts down, after the
in-flight requests have drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jaxpaged.engine import LLMEngine
from jaxpaged.tokenizer import load_tokenizer

from .async_engine import AsyncEngine
from .auth import BearerAuthMiddleware
from .context import ServerContext, context_of
from .settings import ServerSettings
from .errors import APIError
from .generation import create_chat_completion, create_completion
from .json_body import read_json_object
from .metrics import CONTENT_TYPE, ServerMetrics
from .prompts import chat_token_ids, encode, render_chat
from .protocol import parse_detokenize_request, parse_tokenize_request
from .responses import TokenTexts

logger = logging.getLogger(__name__)


def build_app(engine: LLMEngine, settings: ServerSettings) -> Starlette:
    metrics = ServerMetrics(settings.served_model_names[0])
    tokenizer = _own_tokenizer(engine)
    context = ServerContext(
        settings=settings, engine=AsyncEngine(engine, metrics), tokenizer=tokenizer,
        token_texts=TokenTexts(tokenizer), metrics=metrics, max_model_len=engine.max_model_len,
        vocab_size=engine.model_config.vocab_size, max_num_seqs=engine.max_num_seqs,
        max_logprobs=engine.config.max_logprobs)
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=_lifespan,
        middleware=[Middleware(BearerAuthMiddleware, api_key=settings.api_key)],
        exception_handlers={APIError: _api_error, HTTPException: _http_error,
                            Exception: _internal_error})
    app.state.context = context
    return app


def _own_tokenizer(engine: LLMEngine):
    if engine.tokenizer is None:
        return None
    return load_tokenizer(engine.config.tokenizer or engine.config.model)


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette):
    engine = app.state.context.engine
    engine.start(asyncio.get_running_loop())
    try:
        yield
    finally:
        await asyncio.to_thread(engine.stop)


# ----- errors -----

async def _api_error(request: Request, exc: Exception) -> Response:
    return exc.to_response()


async def _http_error(request: Request, exc: Exception) -> Response:
    return APIError(exc.status_code, str(exc.detail), code="not_found"
                    if exc.status_code == 404 else None).to_response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s", request.url.path, exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}",
                    code="internal_error").to_response()


# ----- small endpoints -----

async def health(request: Request) -> Response:
    return Response(status_code=200 if context_of(request).engine.is_running else 503)


async def metrics_endpoint(request: Request) -> Response:
    return Response(context_of(request).metrics.render(), headers={"content-type": CONTENT_TYPE})


async def version(request: Request) -> Response:
    from importlib.metadata import version as package_version
    return JSONResponse({"version": package_version("jaxpaged")})


async def list_models(request: Request) -> Response:
    ctx = context_of(request)
    created = int(time.time())
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "jaxpaged",
         "max_model_len": ctx.max_model_len} for name in ctx.settings.served_model_names]})


async def tokenize(request: Request) -> Response:
    """vLLM's /tokenize: a prompt or chat messages -> token ids."""
    ctx = context_of(request)
    parsed = parse_tokenize_request(await read_json_object(request, ctx.settings.max_body_bytes))
    ctx.check_model(parsed.model)
    if parsed.messages is not None:
        text = render_chat(ctx, parsed.messages, add_generation_prompt=parsed.add_generation_prompt,
                           continue_final_message=False)
        tokens = chat_token_ids(ctx, text)
    else:
        tokens = encode(ctx, parsed.prompt, parsed.add_special_tokens)
    body = {"count": len(tokens), "max_model_len": ctx.max_model_len, "tokens": tokens,
            "token_strs": ctx.tokenizer.convert_ids_to_tokens(tokens)
            if parsed.return_token_strs else None}
    return JSONResponse(body)


async def detokenize(request: Request) -> Response:
    """vLLM's /detokenize: token ids -> text."""
    ctx = context_of(request)
    parsed = parse_detokenize_request(await read_json_object(request, ctx.settings.max_body_bytes))
    ctx.check_model(parsed.model)
    for token_id in parsed.tokens:
        if not 0 <= token_id < ctx.vocab_size:
            raise APIError(400, f"token id {token_id} is not in [0, {ctx.vocab_size})",
                           param="tokens")
    if ctx.tokenizer is None:
        raise APIError(400, "this server has no tokenizer", param="tokens")
    return JSONResponse({"prompt": ctx.tokenizer.decode(parsed.tokens)})
