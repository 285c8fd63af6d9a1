"""OpenAI response bodies: completions and chat, whole and as stream chunks, with logprobs and
vLLM's extras (``stop_reason``, ``token_ids``, ``prompt_token_ids``, ``prompt_logprobs``, echo).

Streamed and non-streamed responses are built from the same per-step deltas: ``Choice.add``
turns one ``CompletionOutput`` delta into a ``Delta`` (text, logprobs fragment, token ids), which
a chunk sends as is and a whole response concatenates. So the two agree by construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any, Literal

from jaxpaged.outputs import CompletionOutput, Logprob, PromptLogprobs

from jaxpaged.server.protocol import ResponseOptions
from jaxpaged.server.tool_calls import ToolCalling
from jaxpaged.server.tool_stream import ToolCallStream

Kind = Literal["completion", "chat"]
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way
TokenText = Callable[[int], str]


@dataclasses.dataclass(frozen=True)
class ResponseMeta:
    """The fields every response and chunk of one request repeats."""

    id: str  # "cmpl-..." / "chatcmpl-..."
    created: int  # unix seconds
    model: str  # the served model name


def token_id_text(token_id: int) -> str:
    """vLLM's ``return_tokens_as_token_ids`` spelling of a token."""
    return f"token_id:{token_id}"


@dataclasses.dataclass
class PromptPart:
    """One prompt as its choices report it (shared by its ``n`` choices)."""

    token_ids: list[int]
    echo_text: str  # what echo puts first ('' without echo)
    logprobs: PromptLogprobs | None = None  # set when the engine reports them


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one step added to one choice."""

    text: str
    logprobs: Any  # the logprobs fragment; None without logprobs
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    first: bool  # the choice's first delta (carries the echo and the prompt's token ids)


def _finite(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


def _top(entry: dict[int, Logprob], top_n: int) -> list[tuple[int, float]]:
    """The top ``top_n`` (token id, logprob) of one position, most likely first (-1: all)."""
    ranked = sorted((lp.rank or 0, token_id, lp.logprob) for token_id, lp in entry.items()
                    if lp.rank is not None and (top_n < 0 or lp.rank <= top_n))
    return [(token_id, _finite(logprob)) for _, token_id, logprob in ranked]


@dataclasses.dataclass
class Choice:
    """One choice (prompt k, sample i -> index k * n + i), accumulated from deltas."""

    index: int
    kind: Kind
    options: ResponseOptions
    texts: TokenText
    prompt: PromptPart
    text_parts: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_offset: int = 0  # completions' logprobs.text_offset of the next token
    logprobs_parts: list[Any] = dataclasses.field(default_factory=list)
    tools: ToolCalling | None = None  # chat with tools: the answer may be tool calls
    tool_stream: ToolCallStream | None = None  # set when the tools are parsed

    def __post_init__(self) -> None:
        if self.tools is not None and self.tools.parses:
            self.tool_stream = ToolCallStream(self.tools)

    def message(self) -> tuple[dict[str, Any], str | None]:
        """(chat message, finish reason): tool calls, when the tools ask for them and the model
        made some, with finish reason "tool_calls"."""
        if self.tools is None or not self.tools.parses:
            return {"role": "assistant", "content": self.text}, self.finish_reason
        content, calls = self.tools.extract(self.text)
        if not calls:
            return {"role": "assistant", "content": self.text}, self.finish_reason
        finish = "tool_calls" if self.finish_reason == "stop" else self.finish_reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, finish

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def add(self, seq: CompletionOutput) -> Delta:
        """Take one delta of this choice's sequence."""
        first = not self.text_parts
        text, token_ids, entries = seq.text, list(seq.token_ids), list(seq.logprobs or ())
        if self.options.hide_output:  # echo with max_tokens 0: the one token run is not shown
            text, token_ids, entries = "", [], []
        self.token_ids.extend(token_ids)
        self.finish_reason = seq.finish_reason or self.finish_reason
        self.stop_reason = seq.stop_reason if seq.stop_reason is not None else self.stop_reason
        positions: list[tuple[int, dict[int, Logprob] | None]] = list(zip(token_ids, entries))
        if first and self.options.echo:
            text = self.prompt.echo_text + text
            if self.kind == "completion":
                positions = list(zip(self.prompt.token_ids, self.prompt.logprobs or ())) + positions
        self.text_parts.append(text)
        fragment = None
        if self.options.top_logprobs is not None:
            fragment = (self._completion_logprobs(positions) if self.kind == "completion"
                        else self._chat_logprobs(positions))
            self.logprobs_parts.append(fragment)
        return Delta(text, fragment, token_ids, seq.finish_reason, seq.stop_reason, first)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def _completion_logprobs(self, positions) -> dict[str, list]:
        out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [],
                                "top_logprobs": []}
        for token_id, entry in positions:
            token = self.texts(token_id)
            out["tokens"].append(token)
            if entry is None:  # the first prompt token has no logprob
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(_finite(entry[token_id].logprob))
                out["top_logprobs"].append(
                    {self.texts(t): lp for t, lp in _top(entry, self.options.top_logprobs)})
            out["text_offset"].append(self.text_offset)
            self.text_offset += len(token)
        return out

    def _chat_logprobs(self, positions) -> list[dict]:
        content = []
        for token_id, entry in positions:
            item = self._chat_token(token_id, entry[token_id].logprob)
            item["top_logprobs"] = [self._chat_token(t, lp)
                                    for t, lp in _top(entry, self.options.top_logprobs)]
            content.append(item)
        return content

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        token = self.texts(token_id)
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}

    def logprobs(self) -> dict | None:
        """The whole choice's logprobs object (None without logprobs)."""
        if self.options.top_logprobs is None:
            return None
        if self.kind == "chat":
            return {"content": [item for part in self.logprobs_parts for item in part]}
        merged: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [],
                                   "top_logprobs": []}
        for part in self.logprobs_parts:
            for key, values in part.items():
                merged[key].extend(values)
        return merged


def prompt_logprobs_json(logprobs: PromptLogprobs | None) -> list | None:
    """vLLM's ``prompt_logprobs``: per prompt token None or {id: {logprob, rank, decoded_token}}."""
    if logprobs is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                      "decoded_token": lp.decoded_token} for t, lp in entry.items()}
            for entry in logprobs]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _head(meta: ResponseMeta, obj: str) -> dict[str, Any]:
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model}


def _completion_choice(c: Choice) -> dict[str, Any]:
    body = {"index": c.index, "text": c.text, "logprobs": c.logprobs(),
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
    if c.options.prompt_logprobs:
        body["prompt_logprobs"] = prompt_logprobs_json(c.prompt.logprobs)
    if c.options.return_token_ids:
        body.update(prompt_token_ids=c.prompt.token_ids, token_ids=c.token_ids)
    return body


def _chat_choice(c: Choice) -> dict[str, Any]:
    message, finish_reason = c.message()
    body = {"index": c.index, "message": message, "logprobs": c.logprobs(),
            "finish_reason": finish_reason, "stop_reason": c.stop_reason}
    if c.options.return_token_ids:
        body["token_ids"] = c.token_ids
    return body


def full_response(meta: ResponseMeta, kind: Kind, choices: list[Choice], prompt_tokens: int,
                  prompt_text: str | None = None) -> dict[str, Any]:
    """The non-streamed response (chat: one prompt, whose extras go at the top level)."""
    if kind == "completion":
        body = _head(meta, "text_completion")
        body["choices"] = [_completion_choice(c) for c in choices]
    else:
        body = _head(meta, "chat.completion")
        body["choices"] = [_chat_choice(c) for c in choices]
        options, prompt = choices[0].options, choices[0].prompt
        if options.prompt_logprobs:
            body["prompt_logprobs"] = prompt_logprobs_json(prompt.logprobs)
        if options.return_token_ids:
            body["prompt_token_ids"] = prompt.token_ids
        if options.return_prompt_text:
            body["prompt_text"] = prompt_text
    body["usage"] = usage(prompt_tokens, sum(c.num_tokens for c in choices))
    return body


_ABSENT = object()


def chunk(meta: ResponseMeta, choice: Choice, delta: Delta, *, message: dict | None = None,
          usage_value: Any = _ABSENT) -> dict[str, Any]:
    """One streamed chunk with one choice's delta. ``message``: a chat choice's delta object
    when it is not the delta's text (tool calls, ``ToolCallStream.delta``); ``usage_value``:
    leave out, None or a dict."""
    extras: dict[str, Any] = {}
    if choice.options.return_token_ids:
        extras["token_ids"] = delta.token_ids
    if choice.kind == "completion":
        body = _head(meta, "text_completion")
        if choice.options.return_token_ids and delta.first:
            extras["prompt_token_ids"] = choice.prompt.token_ids
        body["choices"] = [{"index": choice.index, "text": delta.text, "logprobs": delta.logprobs,
                            "finish_reason": delta.finish_reason,
                            "stop_reason": delta.stop_reason, **extras}]
    else:
        body = _head(meta, "chat.completion.chunk")
        finish_reason = delta.finish_reason
        if message is None:
            message = {"content": delta.text} if delta.text else {}
        elif finish_reason is not None and choice.tool_stream is not None:
            finish_reason = choice.tool_stream.finish_reason(finish_reason)
        body["choices"] = [{"index": choice.index, "delta": message,
                            "logprobs": ({"content": delta.logprobs}
                                         if delta.logprobs is not None else None),
                            "finish_reason": finish_reason,
                            "stop_reason": delta.stop_reason, **extras}]
    if usage_value is not _ABSENT:
        body["usage"] = usage_value
    return body


def role_chunk(meta: ResponseMeta, choice: Choice, prompt_text: str | None, *,
               usage_value: Any = _ABSENT) -> dict[str, Any]:
    """A chat stream's first chunk of a choice: the role (and vLLM's prompt extras)."""
    body = _head(meta, "chat.completion.chunk")
    body["choices"] = [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}]
    if choice.options.return_token_ids:
        body["prompt_token_ids"] = choice.prompt.token_ids
    if choice.options.return_prompt_text:
        body["prompt_text"] = prompt_text
    if usage_value is not _ABSENT:
        body["usage"] = usage_value
    return body


def usage_chunk(meta: ResponseMeta, kind: Kind, usage_value: dict[str, int]) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    body = _head(meta, "text_completion" if kind == "completion" else "chat.completion.chunk")
    body["choices"] = []
    body["usage"] = usage_value
    return body


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
