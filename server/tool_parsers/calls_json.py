"""JSON tool calls as the parsers find them: ``{"name": ..., "arguments"|"parameters": {...}}``."""

from __future__ import annotations

import json
from typing import Any


def call_of(obj: Any) -> tuple[str, dict] | None:
    """(name, arguments) of one decoded call object; None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return (obj["name"], arguments) if isinstance(arguments, dict) else None


def calls_of(text: str) -> list[tuple[str, dict]] | None:
    """The calls of a JSON object or a JSON list of objects; None unless all of it is calls."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [call_of(item) for item in items]
    return calls if calls and all(c is not None for c in calls) else None
