"""Tool calls streamed as OpenAI deltas while they are generated.

A call's first delta carries its ``index``, ``id``, ``type: "function"`` and ``function.name``
(once the name is complete) with the arguments so far; later deltas carry the next pieces of
``function.arguments``. The pieces are slices of the text the model writes, so together they are
the arguments of the finished answer. Content before a call (``auto`` parsers) streams as
content; text that may begin a tool-call marker waits for the next step to tell.

A call cut short (``max_tokens``) stays as far as it was sent; the finished choice reads the whole
output again only when no call was sent (then all of it may be content).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpaged.server.tool_calls import ToolCalling, new_call
from jaxpaged.server.tool_parsers.json_scan import ToolScan


@dataclasses.dataclass
class _SentCall:
    id: str
    arguments: int  # characters of its arguments sent


@dataclasses.dataclass
class ToolCallStream:
    """One choice's tool-call stream: ``delta(text, finished)`` with the choice's whole text so
    far gives the chat ``delta`` object of what is new (empty when nothing is)."""

    tools: ToolCalling
    content_sent: int = 0  # characters of content sent
    calls: list[_SentCall] = dataclasses.field(default_factory=list)

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        scan = self.tools.scan(text, final=finished and not self.calls)
        out: dict[str, Any] = {}
        content = scan.content or ""
        if len(content) > self.content_sent:
            out["content"] = content[self.content_sent:]
            self.content_sent = len(content)
        calls = self._call_deltas(scan)
        if calls:
            out["tool_calls"] = calls
        return out

    def finish_reason(self, finish_reason: str) -> str:
        """"tool_calls" for a choice that stopped after sending calls."""
        return "tool_calls" if finish_reason == "stop" and self.calls else finish_reason

    def _call_deltas(self, scan: ToolScan) -> list[dict[str, Any]]:
        deltas = []
        for index, call in enumerate(scan.calls):
            if index == len(self.calls):
                if not isinstance(call.name, str):
                    break  # its name is not complete yet (nor any later call's)
                first = new_call(call.name, call.arguments)
                self.calls.append(_SentCall(first["id"], len(call.arguments)))
                deltas.append({"index": index, **first})
                continue
            sent = self.calls[index]
            if len(call.arguments) > sent.arguments:
                deltas.append({"index": index, "function": {
                    "arguments": call.arguments[sent.arguments:]}})
                sent.arguments = len(call.arguments)
        return deltas
