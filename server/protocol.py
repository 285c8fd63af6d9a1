"""Request bodies of the OpenAI API (and vLLM's extras) -> typed, validated requests.

``request_fields.py`` says which fields exist and checks their types and bounds; this module
turns the checked values into the typed requests the handlers run. Every check raises
``APIError`` 400 whose ``param`` names the offending field; range checks of the sampling fields
are ``SamplingParams``' own (its ValueError names the field). JSON ``null`` means "not given".
Fields a request omits take the model's generation-config defaults (``GenerationDefaults``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxpaged.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

from jaxpaged.server import field_checks as c
from jaxpaged.server.beam_search import beam_search_params
from jaxpaged.server.errors import bad_request
from jaxpaged.server.generation_defaults import SAMPLING_KEYS, GenerationDefaults
from jaxpaged.server.messages import parse_messages
from jaxpaged.server.request_fields import CHAT_FIELDS, COMPLETION_FIELDS, read_fields
from jaxpaged.server.structured_fields import structured_outputs
from jaxpaged.server.tool_calls import ToolCalling, tool_calling

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions

# Prompt forms of /v1/completions: text, or token ids.
Prompt = str | list[int]

# Fields passed to SamplingParams under their own names when given.
_PASSED_THROUGH = ("n", "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "min_tokens", "skip_special_tokens",
                   "spaces_between_special_tokens", "include_stop_str_in_output",
                   # the sampler's vocabulary masks (vLLM's names and types); the prompt cut,
                   # truncate_prompt_tokens, is the server's own (``prompts.truncate``)
                   "logit_bias", "allowed_token_ids", "bad_words")

# apply_chat_template's own parameters: chat_template_kwargs may not set them.
_TEMPLATE_RESERVED = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    include_usage: bool = False
    """Send a last chunk with the usage (and ``"usage": null`` on the others)."""
    continuous_usage_stats: bool = False
    """vLLM's extra: every chunk carries the usage so far."""


@dataclasses.dataclass(frozen=True)
class Tokenization:
    """How a prompt becomes token ids."""

    add_special_tokens: bool  # BOS ...: completions default True, chat False (the template's)
    truncate_prompt_tokens: int | None  # keep this many prompt tokens; -1: as many as fit
    truncation_side: str  # "left" keeps the last tokens, "right" the first


@dataclasses.dataclass(frozen=True)
class ResponseOptions:
    """What a response carries besides the generated text (vLLM's extras)."""

    top_logprobs: int | None  # top-N logprobs per token; None: no logprobs; -1: all
    echo: bool  # completions: the prompt comes first; chat: the last message's content
    hide_output: bool  # echo with max_tokens 0: only the prompt (one token runs, unreported)
    prompt_logprobs: bool  # the engine's prompt_logprobs go in the response
    return_token_ids: bool
    return_tokens_as_token_ids: bool  # logprob tokens as "token_id:<id>"
    return_prompt_text: bool = False  # chat: the rendered template text


@dataclasses.dataclass(frozen=True)
class Submission:
    """How the request enters the engine."""

    request_id: str | None  # vLLM's request_id (the X-Request-Id header wins)
    priority: int  # lower first, with --scheduling-policy priority
    cache_salt: str | None  # separates this request's prefix-cache entries


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What both endpoints share."""

    model: str | None
    params: SamplingParams  # output_kind DELTA
    stream: bool
    stream_options: StreamOptions
    tokenization: Tokenization
    response: ResponseOptions
    submission: Submission
    logprobs_field: str  # "logprobs" / "top_logprobs", for errors
    max_tokens_field: str  # "max_tokens" / "max_completion_tokens", for errors
    token_id_fields: dict[str, list[int]]  # field -> the token ids it names (vocabulary checks)
    beam_search: BeamSearchParams | None = None  # use_beam_search (/v1/completions)


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    common: GenerationRequest
    prompts: list[Prompt]  # one HTTP request may carry several prompts


@dataclasses.dataclass(frozen=True)
class ChatTemplateOptions:
    chat_template: str | None  # the request's own template (needs --trust-request-chat-template)
    kwargs: dict[str, Any]  # extra template variables (chat_template_kwargs)
    tools: list[dict[str, Any]] | None  # shown to the template
    add_generation_prompt: bool
    continue_final_message: bool


@dataclasses.dataclass(frozen=True)
class ChatCompletionRequest:
    common: GenerationRequest
    messages: list[dict[str, Any]]  # template-ready (messages.py)
    template: ChatTemplateOptions
    tools: ToolCalling | None = None  # None: no tools


@dataclasses.dataclass(frozen=True)
class TokenizeRequest:
    model: str | None
    prompt: str | None  # exactly one of prompt / messages
    messages: list[dict[str, Any]] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    return_token_strs: bool


@dataclasses.dataclass(frozen=True)
class DetokenizeRequest:
    model: str | None
    tokens: list[int]


# ----- shared parts -----

def _stream_options(values: dict[str, Any]) -> tuple[bool, StreamOptions]:
    stream = values.get("stream", False)
    raw = values.get("stream_options")
    if raw is None:
        return stream, StreamOptions()
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true",
                          "stream_options")
    known = {"include_usage", "continuous_usage_stats"}
    for key, value in raw.items():
        if key not in known:
            raise bad_request(f"'stream_options.{key}' is not a field of stream_options",
                              f"stream_options.{key}", "unknown_field")
        if value is not None:
            c.boolean(f"stream_options.{key}", value)
    return stream, StreamOptions(include_usage=bool(raw.get("include_usage")),
                                 continuous_usage_stats=bool(raw.get("continuous_usage_stats")))


def _sampling_params(values: dict[str, Any], defaults: GenerationDefaults, *,
                     max_tokens: int | None, max_tokens_field: str, logprobs: int | None,
                     prompt_logprobs: int | None) -> SamplingParams:
    kwargs = {name: values[name] for name in _PASSED_THROUGH if name in values}
    kwargs["structured_outputs"] = structured_outputs(values)
    for name in SAMPLING_KEYS:  # the request's value, else the model's default
        value = values.get(name, defaults.sampling.get(name))
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs,
                              output_kind=RequestOutputKind.DELTA)
    except ValueError as e:
        message = str(e)
        field = re.match(r"[a-z_]+", message)
        param = field.group(0) if field else None
        if param == "max_tokens":
            param = max_tokens_field
        known = set(kwargs) | {max_tokens_field, "logprobs", "prompt_logprobs"}
        raise bad_request(message, param if param in known else None) from None


def _prompt_logprobs(values: dict[str, Any], stream: bool, echo_logprobs: int | None) -> int | None:
    """vLLM's rules: none while streaming; echo asks for the prompt's logprobs too."""
    value = values.get("prompt_logprobs")
    if value is not None and stream and value != 0:
        raise bad_request("'prompt_logprobs' are not available when 'stream' is true",
                          "prompt_logprobs")
    return value if value is not None else echo_logprobs


def _common(values: dict[str, Any], defaults: GenerationDefaults, *, requested_max: int | None,
            max_tokens_field: str, top_logprobs: int | None, logprobs_field: str,
            add_special_tokens: bool) -> GenerationRequest:
    stream, options = _stream_options(values)
    echo = values.get("echo", False)
    hide_output = echo and requested_max == 0
    prompt_logprobs = _prompt_logprobs(
        values, stream, top_logprobs if echo and logprobs_field == "logprobs" else None)
    # echo with max_tokens 0 runs one token (vLLM's way) and reports none
    max_tokens = 1 if hide_output else defaults.resolve_max_tokens(requested_max)
    params = _sampling_params(values, defaults, max_tokens=max_tokens,
                              max_tokens_field=max_tokens_field, logprobs=top_logprobs,
                              prompt_logprobs=prompt_logprobs)
    response = ResponseOptions(
        top_logprobs=top_logprobs, echo=echo, hide_output=hide_output,
        prompt_logprobs=prompt_logprobs is not None and not stream,
        return_token_ids=values.get("return_token_ids", False),
        return_tokens_as_token_ids=values.get("return_tokens_as_token_ids", False),
        return_prompt_text=values.get("return_prompt_text", False))
    return GenerationRequest(
        model=values.get("model"), params=params, stream=stream, stream_options=options,
        tokenization=Tokenization(
            add_special_tokens=values.get("add_special_tokens", add_special_tokens),
            truncate_prompt_tokens=values.get("truncate_prompt_tokens"),
            truncation_side=values.get("truncation_side", "left")),
        response=response,
        submission=Submission(request_id=values.get("request_id"),
                              priority=values.get("priority", 0),
                              cache_salt=values.get("cache_salt")),
        logprobs_field=logprobs_field, max_tokens_field=max_tokens_field,
        token_id_fields=_token_id_fields(values))


def _token_id_fields(values: dict[str, Any]) -> dict[str, list[int]]:
    fields = {"stop_token_ids": values.get("stop_token_ids"),
              "allowed_token_ids": values.get("allowed_token_ids"),
              "logit_bias": list(values["logit_bias"]) if "logit_bias" in values else None}
    return {name: ids for name, ids in fields.items() if ids}


# ----- /v1/completions -----

def parse_completion_request(body: dict[str, Any],
                             defaults: GenerationDefaults = GenerationDefaults(),
                             max_prompts: int | None = None) -> CompletionRequest:
    """``max_prompts``: most prompts one request may carry (400 beyond; None: no limit)."""
    values = read_fields(body, COMPLETION_FIELDS, where="/v1/completions")
    requested = values.get("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
    if requested == 0 and not values.get("echo"):
        raise bad_request("'max_tokens' must be at least 1 (0 only with 'echo')", "max_tokens")
    common = _common(values, defaults, requested_max=requested, max_tokens_field="max_tokens",
                     top_logprobs=values.get("logprobs"), logprobs_field="logprobs",
                     add_special_tokens=True)
    common = dataclasses.replace(common, beam_search=beam_search_params(values, common.params))
    return CompletionRequest(common=common, prompts=_prompts(body.get("prompt"), max_prompts))


def _prompts(value: Any, max_prompts: int | None = None) -> list[Prompt]:
    """OpenAI's four prompt forms: str, [str, ...], [int, ...], [[int, ...], ...]; a list of
    prompts is all texts or all token-id lists (as OpenAI's and vLLM's schemas), at most
    ``max_prompts`` of them."""
    if value is None:
        raise bad_request("'prompt' is required", "prompt")
    if isinstance(value, str):
        prompts: list[Any] = [value]
    elif isinstance(value, list) and value and all(c.is_int(v) for v in value):
        prompts = [value]
    elif isinstance(value, list) and value:
        prompts = value
    else:
        raise bad_request("'prompt' must be a non-empty string, list of strings, list of token "
                          f"ids or list of lists of token ids, got {c.short(value)}", "prompt")
    if max_prompts is not None and len(prompts) > max_prompts:
        raise bad_request(f"'prompt' may hold at most {max_prompts} prompts "
                          f"(--max-prompts-per-request), got {len(prompts)}", "prompt")
    for prompt in prompts:
        text_ok = isinstance(prompt, str) and prompt
        ids_ok = isinstance(prompt, list) and prompt and all(c.is_int(t) for t in prompt)
        if not (text_ok or ids_ok):
            raise bad_request(f"every prompt must be a non-empty string or a non-empty list of "
                              f"token ids, got {c.short(prompt)}", "prompt")
    if len({isinstance(p, str) for p in prompts}) > 1:
        raise bad_request("'prompt' must not mix strings and lists of token ids", "prompt")
    return prompts


# ----- /v1/chat/completions -----

def parse_chat_request(body: dict[str, Any],
                       defaults: GenerationDefaults = GenerationDefaults(), *,
                       auto_tool_parser: str | None = None) -> ChatCompletionRequest:
    """``auto_tool_parser``: the server's parser of tool_choice "auto" (None: refused)."""
    values = read_fields(body, CHAT_FIELDS, where="/v1/chat/completions")
    tools = tool_calling(values, auto_parser=auto_tool_parser)
    logprobs = values.get("logprobs", False)
    top_logprobs = values.get("top_logprobs")
    if top_logprobs not in (None, 0) and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    # max_completion_tokens is the new name of max_tokens; it wins when both are given.
    field = "max_completion_tokens" if "max_completion_tokens" in values else "max_tokens"
    requested = values.get(field)
    if requested == 0:
        raise bad_request(f"'{field}' must be at least 1", field)
    common = _common(values, defaults, requested_max=requested, max_tokens_field=field,
                     top_logprobs=(top_logprobs or 0) if logprobs else None,
                     logprobs_field="top_logprobs", add_special_tokens=False)
    constraint = tools.constraint() if tools is not None else None
    if constraint is not None:  # required / named tool choice: enforced by a grammar
        if common.params.structured_outputs is not None:
            raise bad_request("'tool_choice' 'required' or a named function cannot be combined "
                              "with structured outputs", "tool_choice")
        common.params.structured_outputs = constraint
    return ChatCompletionRequest(common=common, messages=parse_messages(body.get("messages")),
                                 template=_template_options(values), tools=tools)


def _template_options(values: dict[str, Any]) -> ChatTemplateOptions:
    tools = values.get("tools")
    kwargs = values.get("chat_template_kwargs", {})
    for key in kwargs:
        if key in _TEMPLATE_RESERVED:
            raise bad_request(f"'chat_template_kwargs.{key}' is set by the request itself, not "
                              "by chat_template_kwargs", f"chat_template_kwargs.{key}")
    return ChatTemplateOptions(
        chat_template=values.get("chat_template"), kwargs=kwargs, tools=tools,
        add_generation_prompt=values.get("add_generation_prompt", True),
        continue_final_message=values.get("continue_final_message", False))


# ----- /tokenize and /detokenize (vLLM's shapes) -----

def parse_tokenize_request(body: dict[str, Any]) -> TokenizeRequest:
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise bad_request("give exactly one of 'prompt' and 'messages'", "prompt")

    def get(name: str, check: c.Check, default: Any = None) -> Any:
        value = body.get(name)
        return default if value is None else check(name, value)

    return TokenizeRequest(
        model=get("model", c.string), prompt=get("prompt", c.string),
        messages=parse_messages(body["messages"]) if has_messages else None,
        add_special_tokens=get("add_special_tokens", c.boolean, True),
        add_generation_prompt=get("add_generation_prompt", c.boolean, True),
        return_token_strs=get("return_token_strs", c.boolean, False))


def parse_detokenize_request(body: dict[str, Any]) -> DetokenizeRequest:
    if body.get("tokens") is None:
        raise bad_request("'tokens' is required", "tokens")
    model = body.get("model")
    return DetokenizeRequest(model=None if model is None else c.string("model", model),
                             tokens=c.int_list("tokens", body["tokens"]))
