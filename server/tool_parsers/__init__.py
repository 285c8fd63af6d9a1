"""Tool-call parsers for ``tool_choice: "auto"`` (vLLM's ``--tool-call-parser`` names). Each reads
an output, whole (``final``) or as far as it has come while streaming, into a ``ToolScan``: the
content and the calls (raw argument text). A finished output that is not well-formed calls is all
content."""

from __future__ import annotations

from collections.abc import Callable

from jaxpaged.server.tool_parsers.hermes import parse_hermes
from jaxpaged.server.tool_parsers.json_scan import ToolScan
from jaxpaged.server.tool_parsers.llama3_json import parse_llama3_json
from jaxpaged.server.tool_parsers.mistral import parse_mistral

Parser = Callable[[str, bool], ToolScan]

TOOL_PARSERS: dict[str, Parser] = {"hermes": parse_hermes, "llama3_json": parse_llama3_json,
                                   "mistral": parse_mistral}
