"""Request bodies of the OpenAI API (and vLLM's extras) -> typed, validated requests.

Every check raises ``APIError`` 400 whose ``param`` names the offending field. Range checks of the
sampling fields are ``SamplingParams``' own (its ValueError names the field). JSON ``null`` means
"not given". Fields jaxpaged does not implement are refused when they ask for something
(``suffix``, ``echo``, ``logit_bias``, ``tools`` ...), never silently ignored; fields that change
nothing (``user``, ``parallel_tool_calls`` ...) and unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from jaxpaged.sampling_params import RequestOutputKind, SamplingParams

from jaxpaged.server.errors import bad_request

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions

# Prompt forms of /v1/completions: text, or token ids.
Prompt = str | list[int]


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    include_usage: bool = False
    """Send a last chunk with the usage (and ``"usage": null`` on the others)."""
    continuous_usage_stats: bool = False
    """vLLM's extra: every chunk carries the usage so far."""


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompts: list[Prompt]  # one HTTP request may carry several prompts
    params: SamplingParams  # output_kind DELTA
    stream: bool
    stream_options: StreamOptions
    logprobs: int | None  # top-N logprobs per token; None: no logprobs


@dataclasses.dataclass(frozen=True)
class ChatCompletionRequest:
    model: str | None
    messages: list[dict[str, str]]  # {"role", "content"} with text content
    params: SamplingParams  # output_kind DELTA
    stream: bool
    stream_options: StreamOptions
    logprobs: bool
    top_logprobs: int  # 0 when logprobs is False
    add_generation_prompt: bool
    continue_final_message: bool


@dataclasses.dataclass(frozen=True)
class TokenizeRequest:
    model: str | None
    prompt: str | None  # exactly one of prompt / messages
    messages: list[dict[str, str]] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    return_token_strs: bool


@dataclasses.dataclass(frozen=True)
class DetokenizeRequest:
    model: str | None
    tokens: list[int]


# ----- field readers -----

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(name: str, value: Any) -> int:
    if not _is_int(value):
        raise bad_request(f"'{name}' must be an integer, got {value!r}", name)
    return value


def _number(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a finite number, got {value!r}", name)
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {value!r}", name)
    return value


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, got {value!r}", name)
    return value


def _int_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise bad_request(f"'{name}' must be a list of integers, got {_short(value)}", name)
    return value


def _stop(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"'{name}' must be a string or a list of strings, got {_short(value)}",
                          name)
    return value


def _seed(name: str, value: Any) -> int:
    value = _int(name, value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise bad_request(f"'{name}' must fit in 64 bits, got {value}", name)
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Reader:
    """Typed access to the fields of a JSON object body; ``null`` reads as missing."""

    def __init__(self, body: dict[str, Any]):
        self.body = body

    def get(self, name: str, check: Callable[[str, Any], Any], default: Any = None) -> Any:
        value = self.body.get(name)
        return default if value is None else check(name, value)

    def refuse(self, name: str, allowed: Callable[[Any], bool], what: str) -> None:
        """400 when the field is set to something jaxpaged does not do."""
        value = self.body.get(name)
        if value is not None and not allowed(value):
            raise bad_request(f"'{name}' is not supported ({what}), got {_short(value)}", name)


# ----- shared parts -----

def _stream_options(r: _Reader) -> tuple[bool, StreamOptions]:
    stream = r.get("stream", _bool, False)
    raw = r.body.get("stream_options")
    if raw is None:
        return stream, StreamOptions()
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true",
                          "stream_options")
    if not isinstance(raw, dict):
        raise bad_request(f"'stream_options' must be an object, got {_short(raw)}",
                          "stream_options")
    options = _Reader(raw)
    return stream, StreamOptions(
        include_usage=options.get("include_usage", _prefixed(_bool, "stream_options"), False),
        continuous_usage_stats=options.get("continuous_usage_stats",
                                           _prefixed(_bool, "stream_options"), False))


def _prefixed(check: Callable[[str, Any], Any], parent: str) -> Callable[[str, Any], Any]:
    return lambda name, value: check(f"{parent}.{name}", value)


_SAMPLING_FIELDS = (
    ("n", _int), ("temperature", _number), ("top_p", _number), ("top_k", _int),
    ("min_p", _number), ("presence_penalty", _number), ("frequency_penalty", _number),
    ("repetition_penalty", _number), ("seed", _seed), ("stop", _stop),
    ("stop_token_ids", _int_list), ("ignore_eos", _bool), ("min_tokens", _int),
    ("skip_special_tokens", _bool), ("spaces_between_special_tokens", _bool),
    ("include_stop_str_in_output", _bool),
)


def _sampling_params(r: _Reader, *, max_tokens: int | None, max_tokens_field: str,
                     logprobs: int | None) -> SamplingParams:
    kwargs = {name: r.get(name, check) for name, check in _SAMPLING_FIELDS}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    r.refuse("best_of", lambda v: _is_int(v) and v == kwargs.get("n", 1),
             "use 'n' for several samples")
    try:
        return SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs,
                              output_kind=RequestOutputKind.DELTA)
    except ValueError as e:
        message = str(e)
        field = re.match(r"[a-z_]+", message)
        param = field.group(0) if field else None
        if param == "max_tokens":
            param = max_tokens_field
        raise bad_request(message, param if param in kwargs or param == max_tokens_field
                          else None) from None


def _common_refusals(r: _Reader) -> None:
    r.refuse("logit_bias", lambda v: v == {}, "logit_bias")
    r.refuse("echo", lambda v: v is False, "echo")


# ----- /v1/completions -----

def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    r = _Reader(body)
    _common_refusals(r)
    r.refuse("suffix", lambda v: v == "", "suffix")
    stream, options = _stream_options(r)
    logprobs = r.get("logprobs", _int)
    if logprobs is not None and logprobs < 0:
        raise bad_request(f"'logprobs' must be >= 0, got {logprobs}", "logprobs")
    max_tokens = r.get("max_tokens", _int, DEFAULT_COMPLETION_MAX_TOKENS)
    params = _sampling_params(r, max_tokens=max_tokens, max_tokens_field="max_tokens",
                              logprobs=logprobs)
    return CompletionRequest(model=r.get("model", _str), prompts=_prompts(body.get("prompt")),
                             params=params, stream=stream, stream_options=options,
                             logprobs=logprobs)


def _prompts(value: Any) -> list[Prompt]:
    """OpenAI's four prompt forms: str, [str, ...], [int, ...], [[int, ...], ...]."""
    if value is None:
        raise bad_request("'prompt' is required", "prompt")
    if isinstance(value, str):
        prompts: list[Any] = [value]
    elif isinstance(value, list) and value and all(_is_int(v) for v in value):
        prompts = [value]
    elif isinstance(value, list) and value:
        prompts = value
    else:
        raise bad_request("'prompt' must be a non-empty string, list of strings, list of token "
                          f"ids or list of lists of token ids, got {_short(value)}", "prompt")
    for prompt in prompts:
        text_ok = isinstance(prompt, str) and prompt
        ids_ok = isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)
        if not (text_ok or ids_ok):
            raise bad_request(f"every prompt must be a non-empty string or a non-empty list of "
                              f"token ids, got {_short(prompt)}", "prompt")
    return prompts


# ----- /v1/chat/completions -----

def parse_chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    r = _Reader(body)
    _common_refusals(r)
    r.refuse("tools", lambda v: v == [], "tool calling")
    r.refuse("functions", lambda v: v == [], "function calling")
    r.refuse("tool_choice", lambda v: v == "none", "tool calling")
    r.refuse("response_format", lambda v: v == {"type": "text"}, "only {'type': 'text'}")
    stream, options = _stream_options(r)
    logprobs = r.get("logprobs", _bool, False)
    top_logprobs = r.get("top_logprobs", _int)
    if top_logprobs is not None and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    if top_logprobs is not None and top_logprobs < 0:
        raise bad_request(f"'top_logprobs' must be >= 0, got {top_logprobs}", "top_logprobs")
    # max_completion_tokens is the new name of max_tokens; it wins when both are given.
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    params = _sampling_params(r, max_tokens=r.get(field, _int), max_tokens_field=field,
                              logprobs=(top_logprobs or 0) if logprobs else None)
    return ChatCompletionRequest(
        model=r.get("model", _str), messages=parse_messages(body.get("messages")), params=params,
        stream=stream, stream_options=options, logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        add_generation_prompt=r.get("add_generation_prompt", _bool, True),
        continue_final_message=r.get("continue_final_message", _bool, False))


def parse_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_request(f"'messages' must be a non-empty list, got {_short(value)}", "messages")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(index: int, message: Any) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object, got {_short(message)}", where)
    role = message.get("role")
    if role not in _CHAT_ROLES:
        raise bad_request(f"'{where}.role' must be one of {list(_CHAT_ROLES)}, got {role!r}",
                          f"{where}.role")
    return {"role": role, "content": _content(f"{where}.content", message.get("content"))}


def _content(where: str, content: Any) -> str:
    """Text content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_request(f"'{where}[{i}]' must be a text part "
                                  f"({{'type': 'text', 'text': ...}}); only text is supported, "
                                  f"got {_short(part)}", f"{where}[{i}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"'{where}' must be a string or a list of text parts, got {_short(content)}",
                      where)


# ----- /tokenize and /detokenize (vLLM's shapes) -----

def parse_tokenize_request(body: dict[str, Any]) -> TokenizeRequest:
    r = _Reader(body)
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise bad_request("give exactly one of 'prompt' and 'messages'", "prompt")
    return TokenizeRequest(
        model=r.get("model", _str), prompt=r.get("prompt", _str),
        messages=parse_messages(body["messages"]) if has_messages else None,
        add_special_tokens=r.get("add_special_tokens", _bool, True),
        add_generation_prompt=r.get("add_generation_prompt", _bool, True),
        return_token_strs=r.get("return_token_strs", _bool, False))


def parse_detokenize_request(body: dict[str, Any]) -> DetokenizeRequest:
    r = _Reader(body)
    if body.get("tokens") is None:
        raise bad_request("'tokens' is required", "tokens")
    return DetokenizeRequest(model=r.get("model", _str), tokens=r.get("tokens", _int_list))
