"""Tool-call parsers for ``tool_choice: "auto"`` (vLLM's ``--tool-call-parser`` names): each
turns the model's whole output into (content or None, [(function name, arguments dict)])."""

from __future__ import annotations

from collections.abc import Callable

from jaxpaged.server.tool_parsers.hermes import parse_hermes
from jaxpaged.server.tool_parsers.llama3_json import parse_llama3_json
from jaxpaged.server.tool_parsers.mistral import parse_mistral

ParsedCall = tuple[str, dict]
Parser = Callable[[str], tuple[str | None, list[ParsedCall]]]

TOOL_PARSERS: dict[str, Parser] = {"hermes": parse_hermes, "llama3_json": parse_llama3_json,
                                   "mistral": parse_mistral}
