"""Tool calls read from JSON text as it grows: each call's name once its string is complete, and
the raw text of its arguments so far, so a stream can send the arguments piece by piece and the
pieces add up to the arguments of the finished answer (the same text, not a re-serialization).

Partial JSON parsers (``partial-json-parser``, ``jiter``) return values, not the spans of text
they came from, so this scanner only follows the structure (strings, brackets, scalars) and
leaves the values to ``json.loads`` once they are complete.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection

WHITESPACE = " \t\n\r"
_SCALAR = frozenset("-+.0123456789eEtrufalsn")  # numbers, true, false, null


@dataclasses.dataclass
class PartialCall:
    """One tool call as far as the text goes."""

    name: str | None = None  # once its JSON string is complete
    arguments: str = ""  # the raw JSON text of the arguments so far (never shrinks as text grows)
    complete: bool = False  # its object is closed (arguments "{}" when it had none)


@dataclasses.dataclass
class ToolScan:
    """A parser's reading of an output: its content and its calls. While streaming, ``content``
    is the part known to be content (a possible start of a tool-call marker is held back)."""

    content: str | None
    calls: list[PartialCall]


def skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def string_end(text: str, pos: int) -> int | None:
    """Just past the JSON string opening at ``text[pos]``; None when the text ends inside it."""
    i = pos + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return None


def value_end(text: str, pos: int) -> int | None:
    """Just past the JSON value starting at ``text[pos]``; None when the text ends inside it (a
    scalar at the very end may go on). ValueError when no value starts there."""
    first = text[pos]
    if first == '"':
        return string_end(text, pos)
    if first in "{[":
        depth, i = 0, pos
        while i < len(text):
            if text[i] == '"':
                end = string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            depth += text[i] in "{["
            depth -= text[i] in "}]"
            i += 1
            if depth == 0:
                return i
        return None
    i = pos
    while i < len(text) and text[i] in _SCALAR:
        i += 1
    if i == pos:
        raise ValueError(f"no JSON value at {text[pos:pos + 20]!r}")
    return None if i == len(text) else i


def scan_call(text: str, pos: int, argument_keys: Collection[str]
              ) -> tuple[PartialCall, int | None]:
    """The call object opening at ``text[pos]`` ('{') and the index past it (None: unfinished).
    ``argument_keys``: the keys whose value is the arguments ("arguments", "parameters")."""
    call, seen_arguments, i = PartialCall(), False, skip_whitespace(text, pos + 1)
    while i < len(text):
        if text[i] == "}":
            call.complete = True
            call.arguments = call.arguments if seen_arguments else "{}"
            return call, i + 1
        if text[i] == ",":
            i = skip_whitespace(text, i + 1)
            continue
        if text[i] != '"':
            raise ValueError(f"a call object has {text[i:i + 20]!r} where a key belongs")
        key_end = string_end(text, i)
        colon = len(text) if key_end is None else skip_whitespace(text, key_end)
        if colon < len(text) and text[colon] != ":":
            raise ValueError(f"a call object has {text[colon:colon + 20]!r} after a key")
        start = skip_whitespace(text, colon + 1)
        if start >= len(text):
            return call, None
        key, end = json.loads(text[i:key_end]), value_end(text, start)
        raw = text[start:end] if end is not None else text[start:].rstrip(WHITESPACE)
        if key == "name" and end is not None:
            call.name = json.loads(raw)
        elif key in argument_keys:
            seen_arguments = True
            call.arguments = _arguments(raw, complete=end is not None)
        if end is None:
            return call, None
        i = skip_whitespace(text, end)
    return call, None


def _arguments(raw: str, complete: bool) -> str:
    """Arguments given as a JSON string holding JSON are that string, known once complete."""
    if raw.startswith('"'):
        return json.loads(raw) if complete else ""
    return raw


def scan_calls(text: str, pos: int, argument_keys: Collection[str], separator: str
               ) -> tuple[list[PartialCall], int | None]:
    """Call objects from ``text[pos]`` on, ``separator`` between them: the calls and the index
    where something else starts (None: the text ends inside them)."""
    calls: list[PartialCall] = []
    i = skip_whitespace(text, pos)
    while i < len(text):
        if text[i] != "{":
            return calls, i
        call, end = scan_call(text, i, argument_keys)
        calls.append(call)
        if end is None:
            return calls, None
        i = skip_whitespace(text, end)
        if i < len(text) and text[i] != separator:
            return calls, i
        i = skip_whitespace(text, i + 1)
    return calls, None


def scan_call_list(text: str, pos: int, argument_keys: Collection[str]
                   ) -> tuple[list[PartialCall], int | None]:
    """A JSON list of call objects starting at ``text[pos]`` ('['): the calls and the index past
    the list (None: unfinished). ValueError when it is not a list of objects."""
    calls, end = scan_calls(text, pos + 1, argument_keys, ",")
    if end is not None and text[end] != "]":
        raise ValueError(f"a list of calls has {text[end:end + 20]!r}")
    return calls, None if end is None else end + 1


def valid_calls(calls: list[PartialCall]) -> bool:
    """Every call closed, named by a string, with a JSON object of arguments."""
    if not calls:
        return False
    for call in calls:
        if not call.complete or not isinstance(call.name, str):
            return False
        try:
            if not isinstance(json.loads(call.arguments), dict):
                return False
        except ValueError:
            return False
    return True


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` might begin ``marker`` (kept from a stream
    until the next text tells)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
