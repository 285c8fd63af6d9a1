"""POST /v1/completions and /v1/chat/completions: validate, submit, stream or collect.

Both endpoints turn their body into a ``_Job`` (tokenized prompts + one SamplingParams), hand it
to the engine thread, then either stream server-sent events or wait for the whole answer. The
response id is ``cmpl-<base>`` / ``chatcmpl-<base>`` with vLLM's base: the X-Request-Id header,
else the body's ``request_id``, else a fresh one; the engine request ids are ``f"{id}-{k}"`` for
prompt ``k``; choice ``k * n + i`` is sample ``i`` of prompt ``k``.

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

from jaxpaged.core.scheduler import QueueFullError
from jaxpaged.engine.input_processor import logprobs_over_limit
from jaxpaged.outputs import RequestOutput
from jaxpaged.server.async_engine import (EngineInput, EngineUnavailableError, OutputStream,
                                          RequestFailedError)
from jaxpaged.server.context import ServerContext, context_of
from jaxpaged.server.errors import APIError, bad_request
from jaxpaged.server.json_body import read_json_object
from jaxpaged.server.prompts import chat_token_ids, render_chat, tokenize_prompt, truncate
from jaxpaged.server.protocol import GenerationRequest, parse_chat_request, parse_completion_request
from jaxpaged.server.tool_calls import ToolCalling
from jaxpaged.server.responses import (Choice, Kind, PromptPart, ResponseMeta, chunk, full_response,
                                       role_chunk, sse, token_id_text, usage,
                                       usage_chunk)


@dataclasses.dataclass(frozen=True)
class _Job:
    """A validated generation request, ready for the engine."""

    kind: Kind
    meta: ResponseMeta
    request: GenerationRequest
    inputs: list[EngineInput]
    prompts: list[PromptPart]  # one per input
    prompt_text: str | None = None  # chat: the rendered template
    tools: ToolCalling | None = None  # chat with tools

    @property
    def n(self) -> int:
        return self.request.params.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(i.prompt_token_ids) for i in self.inputs)

    def prompt_index(self) -> dict[str, int]:
        return {i.request_id: k for k, i in enumerate(self.inputs)}

    def new_choices(self, ctx: ServerContext) -> dict[int, Choice]:
        options = self.request.response
        # without a tokenizer a token's text is vLLM's "token_id:N" spelling
        texts = (token_id_text if options.return_tokens_as_token_ids or ctx.tokenizer is None
                 else ctx.token_texts)
        return {k * self.n + i: Choice(k * self.n + i, self.kind, options, texts, prompt,
                                       tools=self.tools)
                for k, prompt in enumerate(self.prompts) for i in range(self.n)}

    def take(self, choices: dict[int, Choice], output: RequestOutput, index_of: dict[str, int]):
        """The choices and deltas of one engine output, in order."""
        k = index_of[output.request_id]
        if output.prompt_logprobs is not None:
            self.prompts[k].logprobs = output.prompt_logprobs
        for seq in output.outputs:
            choice = choices[k * self.n + seq.index]
            yield choice, choice.add(seq)


async def create_completion(request: Request) -> Response:
    ctx = context_of(request)
    parsed = parse_completion_request(
        await read_json_object(request, ctx.settings.max_body_bytes), ctx.generation_defaults,
        max_prompts=ctx.settings.max_prompts_per_request)
    common = parsed.common
    ctx.check_model(common.model)
    prompts, parts = await ctx.host_work.run(_prepare_completion, ctx, parsed)
    job = _make_job(ctx, request, "completion", prompts, parts, common)
    return await _run(request, ctx, job)


def _prepare_completion(tokenizer, ctx: ServerContext, parsed
                        ) -> tuple[list[tuple[str | None, list[int]]], list[PromptPart]]:
    """Tokenized prompts and their echo texts (a worker thread, its own tokenizer)."""
    ctx, common = ctx.with_tokenizer(tokenizer), parsed.common
    room = common.params.max_tokens or 1
    prompts = [tokenize_prompt(ctx, p, common.tokenization, room) for p in parsed.prompts]
    parts = [PromptPart(ids, _completion_echo(ctx, text, ids) if common.response.echo else "")
             for text, ids in prompts]
    return prompts, parts


def _completion_echo(ctx: ServerContext, text: str | None, token_ids: list[int]) -> str:
    """The text echo puts first: the prompt as given, or its (kept) token ids decoded."""
    if text is not None:
        return text
    if ctx.tokenizer is None:
        raise bad_request("'echo' of a token-id prompt needs a tokenizer", "echo")
    return ctx.tokenizer.decode(token_ids)


async def create_chat_completion(request: Request) -> Response:
    ctx = context_of(request)
    parsed = parse_chat_request(
        await read_json_object(request, ctx.settings.max_body_bytes), ctx.generation_defaults,
        auto_tool_parser=ctx.settings.tool_call_parser)
    common = parsed.common
    ctx.check_model(common.model)
    text, ids = await ctx.host_work.run(_prepare_chat, ctx, parsed)
    echo = _chat_echo(parsed.messages, parsed.template.add_generation_prompt)
    part = PromptPart(ids, echo if common.response.echo else "")
    job = _make_job(ctx, request, "chat", [(text, ids)], [part], common, prompt_text=text,
                    tools=parsed.tools)
    return await _run(request, ctx, job)


def _prepare_chat(tokenizer, ctx: ServerContext, parsed) -> tuple[str, list[int]]:
    """The rendered template and its (truncated) token ids (a worker thread)."""
    ctx, common = ctx.with_tokenizer(tokenizer), parsed.common
    text = render_chat(ctx, parsed.messages, parsed.template)
    ids = truncate(ctx, chat_token_ids(ctx, text, common.tokenization.add_special_tokens),
                   common.tokenization, common.params.max_tokens or 1)
    return text, ids


def _chat_echo(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """vLLM's chat echo: the last message's content when the answer continues its role (an
    assistant message, or any role without a generation prompt)."""
    last = messages[-1]
    continues = not add_generation_prompt or last["role"] == "assistant"
    return last["content"] if continues else ""


def _make_job(ctx: ServerContext, request: Request, kind: Kind,
              prompts: list[tuple[str | None, list[int]]], parts: list[PromptPart],
              common: GenerationRequest, prompt_text: str | None = None,
              tools: ToolCalling | None = None) -> _Job:
    _check_limits(ctx, common)
    for _, token_ids in prompts:
        _check_length(ctx, len(token_ids), common.params.max_tokens, kind,
                      common.max_tokens_field)
    base = request.state.request_id or common.submission.request_id or uuid.uuid4().hex
    request.state.request_id = base  # echoed as X-Request-Id
    response_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{base}"
    now = time.time()
    submission = common.submission
    inputs = [EngineInput(f"{response_id}-{k}", text, token_ids, common.params, now,
                          priority=submission.priority, cache_salt=submission.cache_salt,
                          beam_search=common.beam_search)
              for k, (text, token_ids) in enumerate(prompts)]
    meta = ResponseMeta(response_id, int(now), ctx.model_name)
    return _Job(kind, meta, common, inputs, parts, prompt_text, tools)


def _check_limits(ctx: ServerContext, common: GenerationRequest) -> None:
    params = common.params
    if params.n > ctx.max_num_seqs:
        raise bad_request(f"'n' must be at most max_num_seqs={ctx.max_num_seqs}, got {params.n}",
                          "n")
    top = common.response.top_logprobs
    for field, value in ((common.logprobs_field, top), ("prompt_logprobs", params.prompt_logprobs)):
        if logprobs_over_limit(value, ctx.max_logprobs, ctx.vocab_size):  # the engine's rule
            raise bad_request(f"'{field}' asks for more logprobs than --max-logprobs "
                              f"{ctx.max_logprobs} allows, got {value}", field)
    for field, token_ids in common.token_id_fields.items():
        for token_id in token_ids:
            if not 0 <= token_id < ctx.vocab_size:
                raise bad_request(f"{field} token id {token_id} is not in [0, {ctx.vocab_size})",
                                  field)
    priority = common.submission.priority
    if priority != 0 and ctx.scheduling_policy != "priority":
        raise bad_request(f"'priority' {priority} needs the server started with "
                          "--scheduling-policy priority", "priority")


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
    if job.request.stream:
        return EventStreamResponse(_events(ctx, job, stream))
    choices = await _collect_unless_disconnected(request, ctx, job, stream)
    if choices is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    return JSONResponse(full_response(job.meta, job.kind, choices, job.prompt_tokens,
                                      job.prompt_text))


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
            for _ in job.take(choices, output, index_of):
                pass
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
    options, error = job.request.stream_options, None

    def usage_so_far() -> dict[str, int]:
        return usage(job.prompt_tokens, sum(c.num_tokens for c in choices.values()))

    def extra() -> dict[str, Any]:
        if options.continuous_usage_stats:
            return {"usage_value": usage_so_far()}
        return {"usage_value": None} if options.include_usage else {}

    try:
        if job.kind == "chat":  # OpenAI's first chunk of each choice: the role
            for index in sorted(choices):
                yield sse(role_chunk(job.meta, choices[index], job.prompt_text, **extra()))
        async for output in stream:
            for choice, delta in job.take(choices, output, index_of):
                # new token ids alone make a chunk (vLLM's rule): without a tokenizer, or
                # while a multi-byte character is incomplete, the text delta is empty
                message = None
                if choice.tool_stream is not None:  # content and tool calls as they come
                    message = choice.tool_stream.delta(choice.text, bool(delta.finish_reason))
                if (message or delta.text or delta.finish_reason or delta.logprobs
                        or delta.token_ids):
                    yield sse(chunk(job.meta, choice, delta, message=message, **extra()))
        if options.include_usage:
            yield sse(usage_chunk(job.meta, job.kind, usage_so_far()))
    except (RequestFailedError, EngineUnavailableError) as e:
        error = _failure(e)
    finally:
        stream.close()
    if error is not None:
        yield sse(error.to_dict())
    yield sse("[DONE]")
