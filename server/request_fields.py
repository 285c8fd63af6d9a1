"""The inventory of request fields: every field of OpenAI's and vLLM's completion and chat
requests (and of a chat message), each honoured, a no-op, or refused.

- ``HONOURED``: read and acted on (its check gives the type and bounds).
- ``NO_OP``: accepted and type-checked, changes nothing (``user``: OpenAI's end-user id).
- ``REFUSED``: 400 "... is not supported by jaxpaged" naming the field, unless the value asks for
  nothing (``use_beam_search: false``); never silently ignored.

A field in neither table is rejected as unknown (400 naming it). JSON ``null`` means "not
given" for every field. Sources: OpenAI's API reference, and vLLM's ``CompletionRequest`` /
``ChatCompletionRequest`` (``vllm/entrypoints/openai/{completion,chat_completion}/protocol.py``)
including fields older vLLM releases took (``guided_*``, ``best_of``, ``logits_processors``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any

from jaxpaged.server import field_checks as c
from jaxpaged.server.errors import bad_request


class Treatment(enum.Enum):
    HONOURED = "honoured"
    NO_OP = "no-op"
    REFUSED = "refused"


# (value, whole body) -> True when a REFUSED field's value asks for nothing
Harmless = Callable[[Any, Mapping[str, Any]], bool]


def _never(value: Any, body: Mapping[str, Any]) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    name: str
    treatment: Treatment
    check: c.Check = c.anything
    """Type and bounds of a HONOURED or NO_OP value (400 naming the field)."""
    harmless: Harmless = _never
    """REFUSED fields: values that ask for nothing are accepted (and change nothing)."""
    why: str = ""
    """REFUSED fields: what jaxpaged lacks, for the error message."""


def _same(a: Any, b: Any) -> bool:
    """Equality that tells booleans from numbers (``True == 1`` in Python)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _equals(*values: Any) -> Harmless:
    return lambda value, body: any(_same(value, v) for v in values)


def _best_of_is_n(value: Any, body: Mapping[str, Any]) -> bool:
    return _same(value, body.get("n") if body.get("n") is not None else 1)


def honoured(name: str, check: c.Check) -> FieldSpec:
    return FieldSpec(name, Treatment.HONOURED, check)


def no_op(name: str, check: c.Check = c.anything) -> FieldSpec:
    return FieldSpec(name, Treatment.NO_OP, check)


def refused(name: str, why: str, harmless: Harmless = _never) -> FieldSpec:
    return FieldSpec(name, Treatment.REFUSED, harmless=harmless, why=why)


_BEAM = "beam search"
_MULTIMODAL = "multimodal inputs"

# Both endpoints, the same meaning and bounds.
_SHARED = (
    honoured("model", c.string),
    honoured("n", c.count(1)),
    honoured("temperature", c.number),
    honoured("top_p", c.number),
    honoured("top_k", c.count(-1)),
    honoured("min_p", c.number),
    honoured("presence_penalty", c.number),
    honoured("frequency_penalty", c.number),
    honoured("repetition_penalty", c.number),
    honoured("seed", c.integer()),
    honoured("stop", c.stop),
    honoured("stop_token_ids", c.int_list),
    honoured("ignore_eos", c.boolean),
    honoured("min_tokens", c.count(0)),
    honoured("max_tokens", c.count(0)),
    honoured("skip_special_tokens", c.boolean),
    honoured("spaces_between_special_tokens", c.boolean),
    honoured("include_stop_str_in_output", c.boolean),
    honoured("stream", c.boolean),
    honoured("stream_options", c.json_object),
    honoured("logit_bias", c.logit_bias),
    honoured("allowed_token_ids", c.int_list),
    honoured("bad_words", c.string_list),
    honoured("truncate_prompt_tokens", c.count(-1)),
    honoured("truncation_side", c.one_of("left", "right")),
    honoured("prompt_logprobs", c.count(-1)),
    honoured("add_special_tokens", c.boolean),
    honoured("echo", c.boolean),
    honoured("priority", c.integer()),
    honoured("request_id", c.nonempty_string),
    honoured("return_token_ids", c.boolean),
    honoured("return_tokens_as_token_ids", c.boolean),
    honoured("cache_salt", c.nonempty_string),
    no_op("user", c.string),
    no_op("session_id", c.string),
    no_op("routed_experts_prompt_start", c.count(0)),  # no mixture-of-experts models
    no_op("return_token_offsets", c.boolean),  # vLLM: render endpoints only
    no_op("return_mm_kwargs", c.boolean),  # vLLM: render endpoints only
    refused("best_of", "use 'n' for several samples", _best_of_is_n),
    refused("early_stopping", _BEAM, _equals(False)),
    # structured outputs (read together by structured_fields.py, which checks their content)
    honoured("response_format", c.json_object),
    honoured("structured_outputs", c.json_object),
    honoured("guided_json", c.json_object_or_string),
    honoured("guided_regex", c.string),
    honoured("guided_choice", c.string_list),
    honoured("guided_grammar", c.string),
    honoured("guided_decoding_backend", c.string),
    honoured("guided_whitespace_pattern", c.string),
    refused("watermarking", "watermarking", _equals(False)),
    refused("logprob_token_ids", "logprobs of chosen token ids"),
    refused("logits_processors", "custom logits processors"),
    refused("repetition_detection", "repetition detection"),
    refused("thinking_token_budget", "reasoning budgets", _equals(-1)),
    refused("stream_interval", "every step's tokens stream at once", _equals(1)),
    refused("kv_transfer_params", "disaggregated serving"),
    refused("ec_transfer_params", "disaggregated serving"),
    refused("vllm_xargs", "custom extensions"),
)

_COMPLETION_ONLY = (
    honoured("prompt", c.anything),  # its four forms are read by protocol._prompts
    honoured("logprobs", c.count(-1)),
    honoured("use_beam_search", c.boolean),  # n beams as the choices (server/beam_search.py)
    honoured("length_penalty", c.number),
    refused("suffix", "fill-in-the-middle", _equals("")),
    refused("prompt_embeds", "prompt embeddings"),
)

_CHAT_ONLY = (
    honoured("messages", c.anything),  # read message by message (MESSAGE_FIELDS)
    refused("use_beam_search", "beam search on chat completions", _equals(False)),
    refused("length_penalty", "beam search on chat completions", _equals(1.0)),
    honoured("logprobs", c.boolean),
    honoured("top_logprobs", c.count(-1)),
    honoured("max_completion_tokens", c.count(0)),
    honoured("add_generation_prompt", c.boolean),
    honoured("continue_final_message", c.boolean),
    honoured("chat_template", c.string),
    honoured("chat_template_kwargs", c.json_object),
    honoured("tools", c.object_list),  # shown to the chat template; tool_calls.py
    honoured("tool_choice", c.anything),  # "none" / "auto" / "required" / a named function
    honoured("parallel_tool_calls", c.boolean),
    honoured("return_prompt_text", c.boolean),
    no_op("include_reasoning", c.boolean),  # no reasoning parser: the content is the whole text
    no_op("metadata", c.json_object),
    no_op("prompt_cache_key", c.string),  # the prefix cache needs no key
    no_op("safety_identifier", c.string),
    refused("functions", "function calling"),
    refused("function_call", "function calling", _equals("none")),
    refused("documents", "documents for the chat template"),
    refused("reasoning_effort", "reasoning models"),
    refused("verbosity", "reasoning models", _equals("medium")),
    refused("audio", "audio output"),
    refused("modalities", "outputs other than text", _equals(["text"])),
    refused("prediction", "predicted outputs"),
    refused("web_search_options", "web search"),
    refused("store", "stored completions", _equals(False)),
    refused("service_tier", "service tiers", _equals("auto", "default")),
    refused("media_io_kwargs", _MULTIMODAL, _equals({})),
    refused("mm_processor_kwargs", _MULTIMODAL, _equals({})),
)

MESSAGE_FIELDS: dict[str, FieldSpec] = {f.name: f for f in (
    honoured("role", c.anything),  # checked by messages.py, which knows the roles
    honoured("content", c.anything),  # a string or text parts (messages.py)
    honoured("name", c.string),
    honoured("tool_calls", c.object_list),
    honoured("tool_call_id", c.string),
    honoured("reasoning", c.string),
    honoured("reasoning_content", c.string),  # vLLM's older name of ``reasoning``
    honoured("refusal", c.string),
    no_op("annotations", c.anything),  # url citations of an earlier answer
    refused("audio", "audio in messages"),
    refused("function_call", "function calling"),
)}


def _table(*groups: tuple[FieldSpec, ...]) -> dict[str, FieldSpec]:
    table: dict[str, FieldSpec] = {}
    for spec in (s for group in groups for s in group):
        if spec.name in table:
            raise RuntimeError(f"request field {spec.name!r} is listed twice")
        table[spec.name] = spec
    return table


COMPLETION_FIELDS = _table(_SHARED, _COMPLETION_ONLY)
CHAT_FIELDS = _table(_SHARED, _CHAT_ONLY)


def read_fields(body: Mapping[str, Any], table: Mapping[str, FieldSpec], *, where: str,
                prefix: str = "") -> dict[str, Any]:
    """The checked values of ``body``'s given (non-null) fields: honoured, no-op, and refused
    ones at a value that asks for nothing.

    400 naming the field for an unknown field, a refused one that asks for something, or a value
    of the wrong type or range. ``where`` names the object in messages ("/v1/completions");
    ``prefix`` is put before field names in errors ("messages[2].")."""
    values: dict[str, Any] = {}
    for name, value in body.items():
        field = f"{prefix}{name}"
        spec = table.get(name)
        if spec is None:
            raise bad_request(f"'{field}' is not a field of {where}", field, "unknown_field")
        if value is None:
            continue
        if spec.treatment is Treatment.REFUSED:
            if spec.harmless(value, body):
                values[name] = value
                continue
            raise bad_request(f"'{field}' is not supported by jaxpaged ({spec.why}), got "
                              f"{c.short(value)}", field, "unsupported_field")
        values[name] = spec.check(field, value)
    return values
