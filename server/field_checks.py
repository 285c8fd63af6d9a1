"""Checks of JSON values: each takes ``(name, value)``, returns the value (or its normal form) and
raises ``APIError`` 400 naming the field when the type or range is wrong.

The request inventory (``request_fields.py``) gives every field one of these, so the bounds of
every field live in one table. ``INT64`` bounds are the widest any field accepts (seed,
priority): a value beyond them could never reach an int64 column. Counts and lengths (``count``:
n, max_tokens, min_tokens, top_k, logprobs ...) stop at ``INT32_MAX``, ``SamplingParams``' own
bound, so no request value can overflow a device column inside a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from jaxpaged.server.errors import bad_request

from jaxpaged.sampling_params import INT32_MAX, INT64_MAX, INT64_MIN  # noqa: F401 (re-exported)

Check = Callable[[str, Any], Any]


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int = INT64_MIN, high: int = INT64_MAX) -> Check:
    """An int in [low, high]."""
    def check(name: str, value: Any) -> int:
        if not is_int(value):
            raise bad_request(f"'{name}' must be an integer, got {short(value)}", name)
        if not low <= value <= high:
            raise bad_request(f"'{name}' must be in [{low}, {high}], got {value}", name)
        return value
    return check


def count(low: int) -> Check:
    """An int in [low, INT32_MAX]: a count or a length (n, max_tokens, top_k, logprobs ...)."""
    return integer(low, INT32_MAX)


def number(name: str, value: Any) -> float:
    """A finite int or float (range checks are SamplingParams' own)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a finite number, got {short(value)}", name)
    return value


def _of_type(kind: type, what: str) -> Check:
    """A value of Python type ``kind`` ("'x' must be WHAT" otherwise)."""
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, kind):
            raise bad_request(f"'{name}' must be {what}, got {short(value)}", name)
        return value
    return check


def _list_of(ok: Callable[[Any], bool], what: str) -> Check:
    """A list whose every item passes ``ok`` ("'x' must be a list of WHAT" otherwise)."""
    def check(name: str, value: Any) -> list:
        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise bad_request(f"'{name}' must be a list of {what}, got {short(value)}", name)
        return value
    return check


boolean = _of_type(bool, "a boolean")
string = _of_type(str, "a string")
json_object = _of_type(dict, "an object")
int_list = _list_of(is_int, "integers")
string_list = _list_of(lambda v: isinstance(v, str), "strings")
object_list = _list_of(lambda v: isinstance(v, dict), "objects")


def json_object_or_string(name: str, value: Any) -> dict | str:
    """An object, or its JSON text (vLLM's ``guided_json``)."""
    if not isinstance(value, (dict, str)):
        raise bad_request(f"'{name}' must be an object or a JSON string, got {short(value)}", name)
    return value


def nonempty_string(name: str, value: Any) -> str:
    if not string(name, value):
        raise bad_request(f"'{name}' must not be empty", name)
    return value


def one_of(*choices: str) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise bad_request(f"'{name}' must be one of {list(choices)}, got {short(value)}", name)
        return value
    return check


def stop(name: str, value: Any) -> list[str]:
    """A string or a list of strings (OpenAI's ``stop``), as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"'{name}' must be a string or a list of strings, got {short(value)}",
                          name)
    return value


def logit_bias(name: str, value: Any) -> dict[int, float]:
    """OpenAI's ``{"token id": bias}`` (JSON keys are strings) as ``{int: float}``; biases in
    [-100, 100] as OpenAI documents. Token ids are range-checked against the vocabulary later."""
    json_object(name, value)
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not key.lstrip("-").isdigit() or len(key) > 19:
            raise bad_request(f"'{name}' keys must be token ids, got {short(key)}", name)
        number(f"{name}[{key}]", bias)
        if not -100 <= bias <= 100:
            raise bad_request(f"'{name}[{key}]' must be in [-100, 100], got {bias}", name)
        out[int(key)] = float(bias)
    return out


def anything(name: str, value: Any) -> Any:
    """Any JSON value (fields whose content jaxpaged never reads: ``metadata`` ...)."""
    return value


def prefixed(check: Check, parent: str) -> Check:
    """``check`` reporting the field as ``parent.name`` (nested objects)."""
    return lambda name, value: check(f"{parent}.{name}", value)
