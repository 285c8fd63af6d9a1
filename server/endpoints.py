"""The small routes: health, metrics, version, models, and vLLM's /tokenize and /detokenize."""

from __future__ import annotations

from importlib.metadata import version as package_version

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxpaged.server.context import ServerContext, context_of
from jaxpaged.server.errors import APIError, bad_request
from jaxpaged.server.json_body import read_json_object
from jaxpaged.server.metrics import CONTENT_TYPE
from jaxpaged.server.prompts import chat_token_ids, encode, render_chat
from jaxpaged.server.protocol import (ChatTemplateOptions, TokenizeRequest,
                                      parse_detokenize_request, parse_tokenize_request)


async def health(request: Request) -> Response:
    """200 while the engine takes requests; 503 once it drains or its thread is gone. Behind
    replicas, 200 while one of them serves, with each replica's state as JSON."""
    serving, body = await context_of(request).engine.health()
    status = 200 if serving else 503
    return Response(status_code=status) if body is None else JSONResponse(body, status)


async def metrics_endpoint(request: Request) -> Response:
    return Response(await context_of(request).engine.metrics_text(),
                    headers={"content-type": CONTENT_TYPE})


async def version(request: Request) -> Response:
    return JSONResponse({"version": package_version("jaxpaged")})


async def list_models(request: Request) -> Response:
    ctx = context_of(request)
    return JSONResponse({"object": "list", "data": [
        _model_card(ctx, name) for name in ctx.settings.served_model_names]})


async def retrieve_model(request: Request) -> Response:
    """GET /v1/models/{id} (OpenAI's retrieve): the card, or 404 naming the model."""
    ctx = context_of(request)
    name = request.path_params["model"]
    if name not in ctx.settings.served_model_names:
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                            f"{list(ctx.settings.served_model_names)}", param="model",
                       code="model_not_found")
    return JSONResponse(_model_card(ctx, name))


def _model_card(ctx: ServerContext, name: str) -> dict:
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "jaxpaged",
            "root": ctx.settings.served_model_names[0], "max_model_len": ctx.max_model_len}


async def tokenize(request: Request) -> Response:
    """vLLM's /tokenize: a prompt or chat messages -> token ids."""
    ctx = context_of(request)
    parsed = parse_tokenize_request(await read_json_object(request, ctx.settings.max_body_bytes))
    ctx.check_model(parsed.model)
    return JSONResponse(await ctx.host_work.run(_tokenize, ctx, parsed))


def _tokenize(tokenizer, ctx: ServerContext, parsed: TokenizeRequest) -> dict:
    """/tokenize's body (a worker thread, its own tokenizer)."""
    ctx = ctx.with_tokenizer(tokenizer)
    if parsed.messages is not None:
        text = render_chat(ctx, parsed.messages, ChatTemplateOptions(
            chat_template=None, kwargs={}, tools=None,
            add_generation_prompt=parsed.add_generation_prompt, continue_final_message=False))
        tokens = chat_token_ids(ctx, text)
    else:
        tokens = encode(ctx, parsed.prompt, parsed.add_special_tokens)
    return {"count": len(tokens), "max_model_len": ctx.max_model_len, "tokens": tokens,
            "token_strs": tokenizer.convert_ids_to_tokens(tokens)
            if parsed.return_token_strs else None}


async def detokenize(request: Request) -> Response:
    """vLLM's /detokenize: token ids -> text."""
    ctx = context_of(request)
    parsed = parse_detokenize_request(await read_json_object(request, ctx.settings.max_body_bytes))
    ctx.check_model(parsed.model)
    for token_id in parsed.tokens:
        if not 0 <= token_id < ctx.vocab_size:
            raise bad_request(f"token id {token_id} is not in [0, {ctx.vocab_size})", "tokens")
    if ctx.tokenizer is None:
        raise bad_request("this server has no tokenizer", "tokens")
    text = await ctx.host_work.run(lambda tokenizer: tokenizer.decode(parsed.tokens))
    return JSONResponse({"prompt": text})
