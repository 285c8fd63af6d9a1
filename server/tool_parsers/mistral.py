"""Mistral: ``[TOOL_CALLS]`` then a JSON list of ``{"name": ..., "arguments": {...}}``; the text
before the marker is the content."""

from __future__ import annotations

from jaxpaged.server.tool_parsers.calls_json import calls_of

MARKER = "[TOOL_CALLS]"


def parse_mistral(text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    start = text.find(MARKER)
    if start < 0:
        return text, []
    calls = calls_of(text[start + len(MARKER):].strip())
    if calls is None:
        return text, []
    return text[:start].strip() or None, calls
