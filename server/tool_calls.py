"""Tool calling on /v1/chat/completions (OpenAI's ``tools`` / ``tool_choice`` /
``parallel_tool_calls``, vLLM's semantics).

- ``none``: the tools are only shown to the chat template; the answer is text.
- ``required``: a grammar makes the output a JSON list of ``{"name", "parameters"}`` calls of the
  given tools (one call unless ``parallel_tool_calls``), each ``parameters`` valid against its
  function's schema.
- a named function (``{"type": "function", "function": {"name": ...}}``): a grammar makes the
  output that function's arguments.
- ``auto`` (OpenAI's default with tools): needs ``--enable-auto-tool-choice --tool-call-parser
  NAME``; the model's output is parsed after the fact (``tool_parsers``).

The answer then carries OpenAI's ``tool_calls`` (ids ``chatcmpl-tool-<hex>``) and finish reason
"tool_calls". A call's ``arguments`` is the text the model wrote for them (compact JSON under the
grammars), so a stream (``tool_stream``) sends it in pieces as it is generated.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Literal

from jaxpaged.sampling_params import StructuredOutputsParams

from jaxpaged.server import field_checks as c
from jaxpaged.server.errors import bad_request
from jaxpaged.server.tool_parsers import TOOL_PARSERS
from jaxpaged.server.tool_parsers.json_scan import (WHITESPACE, PartialCall, ToolScan,
                                                    scan_call_list, valid_calls)

Mode = Literal["none", "auto", "required", "named"]


@dataclasses.dataclass(frozen=True)
class ToolCalling:
    mode: Mode
    tools: list[dict[str, Any]]
    name: str | None = None  # the named function
    parallel: bool = True
    parser: str | None = None  # auto: --tool-call-parser

    @property
    def parses(self) -> bool:
        return self.mode != "none"

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar that enforces ``required`` and named choices (None otherwise)."""
        if self.mode == "named":
            return StructuredOutputsParams(json=_parameters(self._function(self.name)),
                                           disable_any_whitespace=True)
        if self.mode != "required":
            return None
        calls = [{"type": "object",
                  "properties": {"name": {"const": tool["function"]["name"]},
                                 "parameters": _parameters(tool["function"])},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for tool in self.tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        # compact JSON: the arguments are the model's text as it wrote them, and whitespace the
        # grammar allowed between tokens could fill the output budget (tests show it does)
        return StructuredOutputsParams(json=schema, disable_any_whitespace=True)

    def scan(self, text: str, final: bool) -> ToolScan:
        """The content and calls of an output, whole (``final``: calls only when all of them are
        well-formed, else the text is content) or as far as it has come."""
        if self.mode == "auto":
            return TOOL_PARSERS[self.parser](text, final)
        if self.mode == "named":
            return _scan_named(self.name, text, final)
        if self.mode == "required":
            return _scan_required(text, final)
        return ToolScan(text, [])

    def extract(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, OpenAI tool_calls) of a finished output; no calls: the text is content."""
        scan = self.scan(text, final=True)
        return scan.content, [new_call(c.name, c.arguments) for c in scan.calls]

    def _function(self, name: str) -> dict[str, Any]:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def new_call(name: str, arguments: str) -> dict[str, Any]:
    """An OpenAI tool call with a fresh id."""
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _scan_named(name: str, text: str, final: bool) -> ToolScan:
    """The named function's arguments: the whole output (one JSON object)."""
    call = PartialCall(name, text.strip(WHITESPACE), complete=final)
    if final and not valid_calls([call]):
        return ToolScan(text, [])
    return ToolScan(None, [call])


def _scan_required(text: str, final: bool) -> ToolScan:
    """A JSON list of ``{"name", "parameters"}`` objects (the required grammar's output)."""
    start = len(text) - len(text.lstrip(WHITESPACE))
    calls, end = [], None
    if start < len(text):
        try:
            calls, end = (scan_call_list(text, start, ("parameters",)) if text[start] == "["
                          else ([], None))
        except ValueError:
            calls = []
    if final and (end is None or text[end:].strip(WHITESPACE) or not valid_calls(calls)):
        return ToolScan(text, [])
    return ToolScan(None, calls)


def tool_calling(values: dict[str, Any], *, auto_parser: str | None) -> ToolCalling | None:
    """The request's tool calling (None without tools); ``auto_parser``: the server's
    --tool-call-parser when --enable-auto-tool-choice is on, else None."""
    tools = values.get("tools")
    choice = values.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not tools:
        raise bad_request("'tools' must not be empty (leave it out for no tools)", "tools")
    names = [_tool_name(i, tool) for i, tool in enumerate(tools)]
    parallel = values.get("parallel_tool_calls", True)
    field = "tools" if choice is None else "tool_choice"
    choice = "auto" if choice is None else choice  # OpenAI's default with tools
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request(f"'tool_choice' must be 'none', 'auto', 'required' or "
                              f"{{'type': 'function', 'function': {{'name': ...}}}}, got "
                              f"{c.short(choice)}", "tool_choice")
        if name not in names:
            raise bad_request(f"'tool_choice' names function {name!r}, which is not in 'tools'",
                              "tool_choice")
        return ToolCalling("named", tools, name=name, parallel=parallel)
    if choice in ("none", "required"):
        return ToolCalling(choice, tools, parallel=parallel)
    if choice == "auto":
        if auto_parser is None:
            raise bad_request("tool_choice 'auto' (the default with 'tools') needs the server "
                              "started with --enable-auto-tool-choice and --tool-call-parser; "
                              "send tool_choice 'none', 'required' or a named function",
                              field, "unsupported_field")
        return ToolCalling("auto", tools, parallel=parallel, parser=auto_parser)
    raise bad_request(f"'tool_choice' must be 'none', 'auto', 'required' or a named function, "
                      f"got {c.short(choice)}", "tool_choice")


def _tool_name(index: int, tool: dict[str, Any]) -> str:
    where = f"tools[{index}]"
    function = tool.get("function")
    if tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise bad_request(f"'{where}' must be {{'type': 'function', 'function': {{...}}}}, got "
                          f"{c.short(tool)}", where)
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise bad_request(f"'{where}.function.name' must be a non-empty string", where)
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"'{where}.function.parameters' must be a JSON schema object, got "
                          f"{c.short(parameters)}", where)
    return function["name"]


def check_parser(enable_auto_tool_choice: bool, tool_call_parser: str | None) -> str | None:
    """The auto parser the server runs with (vLLM's start-up rules); ValueError names the flag."""
    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser must be one of {sorted(TOOL_PARSERS)}, got "
                         f"{tool_call_parser!r}")
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    return tool_call_parser if enable_auto_tool_choice else None
