"""Llama 3.x JSON tool calls: the output (after an optional ``<|python_tag|>``) is one JSON
object ``{"name": ..., "parameters": {...}}``, or several separated by ``;``."""

from __future__ import annotations

from jaxpaged.server.tool_parsers.calls_json import calls_of

PYTHON_TAG = "<|python_tag|>"


def parse_llama3_json(text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    for part in body.split(";"):
        found = calls_of(part.strip())
        if found is None:
            return text, []
        calls.extend(found)
    return None, calls
