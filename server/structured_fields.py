"""The structured-outputs fields of a request -> one ``StructuredOutputsParams`` (or None).

Three spellings ask for the same thing (vLLM takes all of them): OpenAI's ``response_format``
(``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"schema": ...}}``; ``text``
asks for nothing), vLLM's ``structured_outputs`` object (``StructuredOutputsParams``' fields), and
the older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (with
``guided_whitespace_pattern``). A request uses one of them; 400 naming the field otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpaged.sampling_params import StructuredOutputsParams

from jaxpaged.server import field_checks as c
from jaxpaged.server.errors import bad_request

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
# guided_decoding_backend values that name the one backend there is (or let the server pick)
BACKENDS = ("auto", "guidance", "llguidance")
_PARAM_FIELDS = {f.name for f in dataclasses.fields(StructuredOutputsParams)}


def structured_outputs(values: dict[str, Any]) -> StructuredOutputsParams | None:
    """The request's constraint; ``values``: its checked fields (request_fields)."""
    sources = {}
    response_format = values.get("response_format")
    if response_format is not None and response_format.get("type") != "text":
        sources["response_format"] = lambda: _from_response_format(response_format)
    if "structured_outputs" in values:
        sources["structured_outputs"] = lambda: _from_object(values["structured_outputs"])
    guided = [name for name in _GUIDED if name in values]
    if guided:
        sources[guided[0]] = lambda: _from_guided(values, guided)
    backend = values.get("guided_decoding_backend")
    if backend is not None and backend.split(":")[0] not in BACKENDS:
        raise bad_request(f"'guided_decoding_backend' must be one of {list(BACKENDS)} (jaxpaged "
                          f"has llguidance only), got {c.short(backend)}",
                          "guided_decoding_backend")
    if "guided_whitespace_pattern" in values and "guided_json" not in values:
        raise bad_request("'guided_whitespace_pattern' needs 'guided_json'",
                          "guided_whitespace_pattern")
    if len(sources) > 1:
        raise bad_request(f"give one kind of structured outputs, got {list(sources)}",
                          list(sources)[1])
    if not sources:
        return None
    return next(iter(sources.values()))()


def _params(field: str, **kwargs: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except ValueError as e:
        raise bad_request(str(e), field) from None


def _from_response_format(value: dict[str, Any]) -> StructuredOutputsParams:
    kind = value.get("type")
    if kind == "json_object":
        return _params("response_format", json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema'",
                              "response_format.json_schema")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise bad_request(f"'response_format.json_schema.schema' must be a JSON schema "
                              f"object, got {c.short(schema)}", "response_format.json_schema")
        return _params("response_format", json=schema)
    if kind == "structural_tag":
        raise bad_request("'response_format' of type 'structural_tag' is not supported by "
                          "jaxpaged", "response_format", "unsupported_field")
    raise bad_request(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', "
                      f"got {c.short(kind)}", "response_format.type")


def _from_object(value: dict[str, Any]) -> StructuredOutputsParams:
    unknown = sorted(set(value) - _PARAM_FIELDS)
    if unknown:
        raise bad_request(f"'structured_outputs.{unknown[0]}' is not a field of "
                          "structured_outputs", f"structured_outputs.{unknown[0]}",
                          "unknown_field")
    return _params("structured_outputs",
                   **{k: v for k, v in value.items() if v is not None})


def _from_guided(values: dict[str, Any], guided: list[str]) -> StructuredOutputsParams:
    if len(guided) > 1:
        raise bad_request(f"give one of {list(_GUIDED)}, got {guided}", guided[1])
    name = guided[0]
    kwargs: dict[str, Any] = {_GUIDED[name]: values[name]}
    if "guided_whitespace_pattern" in values:
        kwargs["whitespace_pattern"] = values["guided_whitespace_pattern"]
    return _params(name, **kwargs)
