"""Hermes (Qwen, NousResearch): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks; the text before the first block is the content (vLLM's ``hermes`` parser)."""

from __future__ import annotations

from jaxpaged.server.tool_parsers.json_scan import (PartialCall, ToolScan, held_back, scan_call,
                                                    skip_whitespace, valid_calls)

START, END = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments",)


def parse_hermes(text: str, final: bool) -> ToolScan:
    start = text.find(START)
    if start < 0:
        return ToolScan(text if final else text[:len(text) - held_back(text, START)], [])
    try:
        calls = _blocks(text, start)
    except ValueError:
        calls = []
    if final and not valid_calls(calls):
        return ToolScan(text, [])
    return ToolScan(text[:start] or None, calls)


def _blocks(text: str, start: int) -> list[PartialCall]:
    """The call of each block (the text between blocks is dropped, as vLLM does)."""
    calls: list[PartialCall] = []
    while start >= 0:
        pos = skip_whitespace(text, start + len(START))
        if pos == len(text):
            break
        if text[pos] != "{":
            raise ValueError(f"a {START} block holds {text[pos:pos + 20]!r}")
        call, end = scan_call(text, pos, ARGUMENT_KEYS)
        calls.append(call)
        if end is None:
            break
        start = text.find(START, end)
    return calls
