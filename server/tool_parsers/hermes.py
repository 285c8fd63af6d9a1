"""Hermes (Qwen, NousResearch): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks; the text before the first block is the content."""

from __future__ import annotations

import re

from jaxpaged.server.tool_parsers.calls_json import calls_of

_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for block in _BLOCK.findall(text[start:]):
        found = calls_of(block.strip())
        if found is None:
            return text, []
        calls.extend(found)
    return text[:start].strip() or None, calls
