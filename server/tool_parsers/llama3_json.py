"""Llama 3.x JSON tool calls: the output (after an optional ``<|python_tag|>``) is one JSON
object ``{"name": ..., "parameters": {...}}``, or several separated by ``;``; anything else is
content (vLLM's ``llama3_json`` parser)."""

from __future__ import annotations

from jaxpaged.server.tool_parsers.json_scan import (WHITESPACE, ToolScan, scan_calls,
                                                    valid_calls)

PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("parameters", "arguments")


def parse_llama3_json(text: str, final: bool) -> ToolScan:
    body = text.lstrip(WHITESPACE)
    if not final and (not body or PYTHON_TAG.startswith(body)):
        return ToolScan("", [])  # too early to tell
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip(WHITESPACE)
    if not body.startswith("{") and (final or body):
        return ToolScan(text, [])
    try:
        calls, end = scan_calls(body, 0, ARGUMENT_KEYS, ";")
    except ValueError:
        calls, end = [], 0
    if final and (end is not None or not valid_calls(calls)):
        return ToolScan(text, [])
    return ToolScan(None, calls)
