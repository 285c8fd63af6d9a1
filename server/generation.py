"""POST /v1/completions and /v1/chat/completions: validate, submit, stream or collect.

Both endpoints turn their body into a ``_Job`` (tokenized prompts + one SamplingParams), hand it
to the engine thread, then either stream server-sent events or wait for the whole answer. The
engine request ids are ``f"{response_id}-{k}"`` for prompt ``k``; choice ``k * n + i`` is sample
``i`` of prompt ``k``.

A client that goes away aborts its requests: the stream's generator is closed (``finally``), and a
non-streamed request watches the connection for ``http.disconnect`` while it waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from jaxpaged.sampling_params import SamplingParams
from jaxpaged.core.scheduler import QueueFullError

from jaxpaged.server.async_engine import EngineInput, EngineUnavailableError, OutputStream, RequestFailedError
from jaxpaged.server.context import ServerContext, context_of
from jaxpaged.server.errors import APIError, bad_request
from jaxpaged.server.json_body import read_json_object
from jaxpaged.server.prompts import chat_token_ids, render_chat, tokenize_prompt
from jaxpaged.server.protocol import StreamOptions, parse_chat_request, parse_completion_request
from jaxpaged.server.responses import Choice, Kind, ResponseMeta, chunk, full_response, sse, usage, usage_chunk


@dataclasses.dataclass(frozen=True)
class _Job:
    """A validated generation request, ready for the engine."""

    kind: Kind
    meta: ResponseMeta
    inputs: list[EngineInput]
    n: int
    stream: bool
    options: StreamOptions
    top_logprobs: int | None  # None: no logprobs

    @property
    def prompt_tokens(self) -> int:
        return sum(len(i.prompt_token_ids) for i in self.inputs)

    def prompt_index(self) -> dict[str, int]:
        return {i.request_id: k for k, i in enumerate(self.inputs)}

    def new_choices(self, ctx: ServerContext) -> dict[int, Choice]:
        return {index: Choice(index, self.kind, self.top_logprobs, ctx.token_texts)
                for index in range(len(self.inputs) * self.n)}


async def create_completion(request: Request) -> Response:
    ctx = context_of(request)
    parsed = parse_completion_request(
        await read_json_object(request, ctx.settings.max_body_bytes))
    ctx.check_model(parsed.model)
    prompts = [tokenize_prompt(ctx, p) for p in parsed.prompts]
    job = _make_job(ctx, "completion", prompts, parsed.params, parsed.stream,
                    parsed.stream_options, parsed.logprobs, "logprobs", "max_tokens")
    return await _run(request, ctx, job)


async def create_chat_completion(request: Request) -> Response:
    ctx = context_of(request)
    body = await read_json_object(request, ctx.settings.max_body_bytes)
    parsed = parse_chat_request(body)
    ctx.check_model(parsed.model)
    text = render_chat(ctx, parsed.messages, add_generation_prompt=parsed.add_generation_prompt,
                       continue_final_message=parsed.continue_final_message)
    top = parsed.top_logprobs if parsed.logprobs else None
    max_tokens_field = ("max_completion_tokens" if body.get("max_completion_tokens") is not None
                        else "max_tokens")
    job = _make_job(ctx, "chat", [(text, chat_token_ids(ctx, text))], parsed.params,
                    parsed.stream, parsed.stream_options, top, "top_logprobs", max_tokens_field)
    return await _run(request, ctx, job)


def _make_job(ctx: ServerContext, kind: Kind, prompts: list[tuple[str | None, list[int]]],
              params: SamplingParams, stream: bool, options: StreamOptions,
              top_logprobs: int | None, logprobs_field: str, max_tokens_field: str) -> _Job:
    _check_limits(ctx, params, top_logprobs, logprobs_field)
    for _, token_ids in prompts:
        _check_length(ctx, len(token_ids), params.max_tokens, kind, max_tokens_field)
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    now = time.time()
    inputs = [EngineInput(f"{response_id}-{k}", text, token_ids, params, now)
              for k, (text, token_ids) in enumerate(prompts)]
    meta = ResponseMeta(response_id, int(now), ctx.model_name)
    return _Job(kind, meta, inputs, params.n, stream, options, top_logprobs)


def _check_limits(ctx: ServerContext, params: SamplingParams, top_logprobs: int | None,
                  logprobs_field: str) -> None:
    if params.n > ctx.max_num_seqs:
        raise bad_request(f"'n' must be at most max_num_seqs={ctx.max_num_seqs}, got {params.n}",
                          "n")
    if top_logprobs is not None and top_logprobs > ctx.max_logprobs:
        raise bad_request(f"'{logprobs_field}' must be at most {ctx.max_logprobs}, got "
                          f"{top_logprobs}", logprobs_field)
    for token_id in params.stop_token_ids:
        if token_id >= ctx.vocab_size:
            raise bad_request(f"stop token id {token_id} is not in [0, {ctx.vocab_size})",
                              "stop_token_ids")


def _check_length(ctx: ServerContext, num_prompt_tokens: int, max_tokens: int | None,
                  kind: Kind, max_tokens_field: str) -> None:
    what = "messages" if kind == "chat" else "prompt"
    if num_prompt_tokens >= ctx.max_model_len:
        raise bad_request(f"this model's maximum context length is {ctx.max_model_len} tokens, "
                          f"and the {what} has {num_prompt_tokens} tokens (at most "
                          f"{ctx.max_model_len - 1} leave room for an output token)", what,
                          "context_length_exceeded")
    if max_tokens is not None and num_prompt_tokens + max_tokens > ctx.max_model_len:
        raise bad_request(f"this model's maximum context length is {ctx.max_model_len} tokens; "
                          f"you asked for {num_prompt_tokens + max_tokens} ({num_prompt_tokens} "
                          f"in the {what}, {max_tokens} in the completion)", max_tokens_field,
                          "context_length_exceeded")


async def _run(request: Request, ctx: ServerContext, job: _Job) -> Response:
    stream = await _submit(ctx, job)
    if job.stream:
        return EventStreamResponse(_events(ctx, job, stream))
    choices = await _collect_unless_disconnected(request, ctx, job, stream)
    if choices is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    return JSONResponse(full_response(job.meta, job.kind, choices, job.prompt_tokens))


async def _submit(ctx: ServerContext, job: _Job) -> OutputStream:
    try:
        return await ctx.engine.submit(job.inputs)
    except QueueFullError as e:
        raise APIError(503, f"the server is overloaded: {e}", code="queue_full") from None
    except EngineUnavailableError as e:
        raise APIError(503, str(e), code="unavailable") from None
    except ValueError as e:  # what the engine itself refused
        raise bad_request(str(e)) from None


def _failure(error: Exception) -> APIError:
    if isinstance(error, EngineUnavailableError):
        return APIError(503, str(error), code="unavailable")
    return APIError(500, str(error), code="engine_error")


# ----- non-streamed -----

async def _collect(ctx: ServerContext, job: _Job, stream: OutputStream) -> list[Choice]:
    choices, index_of = job.new_choices(ctx), job.prompt_index()
    try:
        async for output in stream:
            base = index_of[output.request_id] * job.n
            for seq in output.outputs:
                choices[base + seq.index].add(seq)
    except (RequestFailedError, EngineUnavailableError) as e:
        raise _failure(e) from None
    return [choices[i] for i in sorted(choices)]


async def _collect_unless_disconnected(request: Request, ctx: ServerContext, job: _Job,
                                       stream: OutputStream) -> list[Choice] | None:
    collect = asyncio.ensure_future(_collect(ctx, job, stream))
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        return collect.result() if collect.done() else None
    finally:
        collect.cancel()
        gone.cancel()
        stream.close()  # aborts whatever is unfinished (nothing, when collect completed)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ----- streamed -----

class EventStreamResponse(StreamingResponse):
    """Server-sent events whose generator is always closed when the response ends, however it
    ends (finished, client gone, server cancelled), so its ``finally`` aborts the requests."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, headers={"cache-control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _events(ctx: ServerContext, job: _Job, stream: OutputStream) -> AsyncIterator[str]:
    choices, index_of = job.new_choices(ctx), job.prompt_index()
    options, error = job.options, None

    def usage_so_far() -> dict[str, int]:
        return usage(job.prompt_tokens, sum(c.num_tokens for c in choices.values()))

    def extra() -> dict[str, Any]:
        if options.continuous_usage_stats:
            return {"usage_value": usage_so_far()}
        return {"usage_value": None} if options.include_usage else {}

    try:
        if job.kind == "chat":  # OpenAI's first chunk of each choice: the role
            for index in sorted(choices):
                yield sse(chunk(job.meta, "chat", index, text="", logprobs=None,
                                finish_reason=None, role=True, **extra()))
        async for output in stream:
            base = index_of[output.request_id] * job.n
            for seq in output.outputs:
                text, fragment = choices[base + seq.index].add(seq)
                # new token ids alone make a chunk (vLLM's rule): without a tokenizer, or
                # while a multi-byte character is incomplete, the text delta is empty
                if text or seq.finish_reason or fragment or seq.token_ids:
                    yield sse(chunk(job.meta, job.kind, base + seq.index, text=text,
                                    logprobs=fragment, finish_reason=seq.finish_reason,
                                    **extra()))
        if options.include_usage:
            yield sse(usage_chunk(job.meta, job.kind, usage_so_far()))
    except (RequestFailedError, EngineUnavailableError) as e:
        error = _failure(e)
    finally:
        stream.close()
    if error is not None:
        yield sse(error.to_dict())
    yield sse("[DONE]")
