"""Mistral: ``[TOOL_CALLS]`` then a JSON list of ``{"name": ..., "arguments": {...}}``; the text
before the marker is the content (vLLM's ``mistral`` parser)."""

from __future__ import annotations

from jaxpaged.server.tool_parsers.json_scan import (ToolScan, held_back, scan_call_list,
                                                    skip_whitespace, valid_calls)

MARKER = "[TOOL_CALLS]"
ARGUMENT_KEYS = ("arguments",)


def parse_mistral(text: str, final: bool) -> ToolScan:
    start = text.find(MARKER)
    if start < 0:
        return ToolScan(text if final else text[:len(text) - held_back(text, MARKER)], [])
    pos = skip_whitespace(text, start + len(MARKER))
    calls = []
    if pos < len(text) and text[pos] == "[":
        try:
            calls, _ = scan_call_list(text, pos, ARGUMENT_KEYS)
        except ValueError:
            calls = []
    elif pos < len(text):
        return ToolScan(text, []) if final else ToolScan(text[:start] or None, [])
    if final and not valid_calls(calls):
        return ToolScan(text, [])
    return ToolScan(text[:start] or None, calls)
