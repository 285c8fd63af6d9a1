"""The grammar backend: llguidance. The model's tokenizer is handed to it once per engine
(``GuidanceBackend``); each ``StructuredOutputsParams`` becomes an llguidance grammar, compiled into
a matcher template that every request of that grammar copies (``LLMatcher.deep_copy``)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf

from jaxpaged.structured.params import StructuredOutputsParams

# The keys of llguidance's ``x-guidance`` JSON options that shape whitespace.
WHITESPACE_OPTIONS = {"whitespace_flexible", "whitespace_pattern"}


class GuidanceBackend:
    """llguidance over one tokenizer, with the model's vocabulary size (its padded ids beyond
    the tokenizer's are never allowed) and its EOS ids (allowed once a grammar accepts)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        eos = [int(t) for t in eos_token_ids] or None
        if len(hf_tokenizer) > vocab_size:
            raise ValueError(f"the tokenizer has {len(hf_tokenizer)} tokens, more than the "
                             f"model's vocab_size={vocab_size}")
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                                      eos_token=eos)

    def grammar(self, params: StructuredOutputsParams) -> str:
        """The llguidance grammar of ``params``; ValueError naming the field when it is invalid
        (checked here, so that a bad request fails when it is added)."""
        kind = params.kind
        try:
            if kind in ("json", "json_object"):
                schema = {"type": "object"} if kind == "json_object" else params.json
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    _schema(schema, params), defaults=json_whitespace(params, schema))
            elif kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(params.regex)
            elif kind == "choice":
                grammar = llguidance.grammar_from("choice", params.choice)
            else:
                grammar = llguidance.grammar_from("grammar", params.grammar)
        except ValueError as e:
            raise ValueError(f"structured_outputs.{kind} is invalid: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"structured_outputs.{kind} is invalid: {error.strip()}")
        return grammar

    def compile(self, grammar: str) -> llguidance.LLMatcher:
        """A matcher template of ``grammar`` (its lexer built); requests copy it."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar does not compile: {matcher.get_error()}")
        return matcher


def _schema(schema: Any, params: StructuredOutputsParams) -> Any:
    if not params.disable_additional_properties or not isinstance(schema, dict):
        return schema
    schema = copy.deepcopy(schema)
    _close_objects(schema)
    return schema


def _close_objects(node: Any) -> None:
    """``additionalProperties: false`` on every object schema that does not set it (vLLM's
    ``disable_additional_properties``)."""
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)


def json_whitespace(params: StructuredOutputsParams, schema: Any) -> dict[str, Any]:
    """llguidance's JSON whitespace options, as vLLM's guidance backend sets them: by default any
    JSON whitespace (spaces, tabs, newlines; runs of any length) may come between tokens
    (``whitespace_flexible``); ``disable_any_whitespace`` makes the JSON compact. They are
    defaults, so a schema's own ``x-guidance`` options win; a request that sets whitespace
    options as well as its schema is refused (one of the two would be ignored)."""
    own = schema.get("x-guidance") if isinstance(schema, dict) else None
    if isinstance(own, dict) and own.keys() & WHITESPACE_OPTIONS and (
            params.disable_any_whitespace or params.whitespace_pattern is not None):
        raise ValueError("structured_outputs.disable_any_whitespace / whitespace_pattern "
                         "conflict with the schema's own x-guidance whitespace options")
    options: dict[str, Any] = {"whitespace_flexible": not params.disable_any_whitespace}
    if params.whitespace_pattern is not None:
        options["whitespace_pattern"] = params.whitespace_pattern
    return options
