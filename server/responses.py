"""OpenAI response bodies: completions and chat, whole and as stream chunks, with logprobs.

Streamed and non-streamed responses are built from the same per-step deltas: ``Choice.add``
turns one ``CompletionOutput`` delta into text and a logprobs fragment, which a chunk sends as is
and a whole response concatenates. So the two agree by construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any, Literal


from jaxpaged.outputs import CompletionOutput, Logprob

if TYPE_CHECKING:  # transformers loads only when a tokenizer does
    from transformers import PreTrainedTokenizerBase

Kind = Literal["completion", "chat"]
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way


@dataclasses.dataclass(frozen=True)
class ResponseMeta:
    """The fields every response and chunk of one request repeats."""

    id: str  # "cmpl-..." / "chatcmpl-..."
    created: int  # unix seconds
    model: str  # the served model name


class TokenTexts:
    """Token id -> its text piece, cached (for logprobs)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (self._tokenizer.decode([token_id]) if self._tokenizer is not None
                    else f"token_id:{token_id}")
            if len(self._cache) < 1_000_000:
                self._cache[token_id] = text
        return text


def _finite(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


def _top(entry: dict[int, Logprob], top_n: int) -> list[tuple[int, float]]:
    """The top ``top_n`` (token id, logprob) of one position, most likely first."""
    ranked = sorted((lp.rank or 0, token_id, lp.logprob) for token_id, lp in entry.items()
                    if lp.rank is not None and lp.rank <= top_n)
    return [(token_id, _finite(logprob)) for _, token_id, logprob in ranked]


@dataclasses.dataclass
class Choice:
    """One choice (prompt k, sample i -> index k * n + i), accumulated from deltas."""

    index: int
    kind: Kind
    top_n: int | None  # None: no logprobs
    texts: TokenTexts
    text_parts: list[str] = dataclasses.field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    text_offset: int = 0  # completions' logprobs.text_offset of the next token
    logprobs_parts: list[Any] = dataclasses.field(default_factory=list)

    def add(self, seq: CompletionOutput) -> tuple[str, Any]:
        """Take one delta; returns its text and its logprobs fragment (None without logprobs)."""
        self.text_parts.append(seq.text)
        self.num_tokens += len(seq.token_ids)
        self.finish_reason = seq.finish_reason or self.finish_reason
        fragment = None
        if self.top_n is not None:
            fragment = (self._completion_logprobs(seq) if self.kind == "completion"
                        else self._chat_logprobs(seq))
            self.logprobs_parts.append(fragment)
        return seq.text, fragment

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def _completion_logprobs(self, seq: CompletionOutput) -> dict[str, list]:
        out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [],
                                "top_logprobs": []}
        for token_id, entry in zip(seq.token_ids, seq.logprobs or ()):
            token = self.texts(token_id)
            out["tokens"].append(token)
            out["token_logprobs"].append(_finite(entry[token_id].logprob))
            out["top_logprobs"].append({self.texts(t): lp for t, lp in _top(entry, self.top_n)})
            out["text_offset"].append(self.text_offset)
            self.text_offset += len(token)
        return out

    def _chat_logprobs(self, seq: CompletionOutput) -> list[dict]:
        content = []
        for token_id, entry in zip(seq.token_ids, seq.logprobs or ()):
            item = self._chat_token(token_id, entry[token_id].logprob)
            item["top_logprobs"] = [self._chat_token(t, lp) for t, lp in _top(entry, self.top_n)]
            content.append(item)
        return content

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        token = self.texts(token_id)
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}

    def logprobs(self) -> dict | None:
        """The whole choice's logprobs object (None without logprobs)."""
        if self.top_n is None:
            return None
        if self.kind == "chat":
            return {"content": [item for part in self.logprobs_parts for item in part]}
        merged: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [],
                                   "top_logprobs": []}
        for part in self.logprobs_parts:
            for key, values in part.items():
                merged[key].extend(values)
        return merged


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _head(meta: ResponseMeta, obj: str) -> dict[str, Any]:
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model}


def full_response(meta: ResponseMeta, kind: Kind, choices: list[Choice],
                  prompt_tokens: int) -> dict[str, Any]:
    """The non-streamed response."""
    if kind == "completion":
        body = _head(meta, "text_completion")
        body["choices"] = [{"index": c.index, "text": c.text, "logprobs": c.logprobs(),
                            "finish_reason": c.finish_reason} for c in choices]
    else:
        body = _head(meta, "chat.completion")
        body["choices"] = [{"index": c.index,
                            "message": {"role": "assistant", "content": c.text},
                            "logprobs": c.logprobs(), "finish_reason": c.finish_reason}
                           for c in choices]
    body["usage"] = usage(prompt_tokens, sum(c.num_tokens for c in choices))
    return body


_ABSENT = object()


def chunk(meta: ResponseMeta, kind: Kind, index: int, *, text: str | None,
          logprobs: Any, finish_reason: str | None, role: bool = False,
          usage_value: Any = _ABSENT) -> dict[str, Any]:
    """One streamed chunk with one choice. ``usage_value``: leave out, None or a usage dict."""
    if kind == "completion":
        body = _head(meta, "text_completion")
        body["choices"] = [{"index": index, "text": text or "", "logprobs": logprobs,
                            "finish_reason": finish_reason}]
    else:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text or role:
            delta["content"] = text or ""
        body = _head(meta, "chat.completion.chunk")
        body["choices"] = [{"index": index, "delta": delta,
                            "logprobs": {"content": logprobs} if logprobs is not None else None,
                            "finish_reason": finish_reason}]
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
