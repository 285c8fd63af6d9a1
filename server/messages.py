"""Chat messages of a request -> the dicts the chat template renders.

Every key a message may carry is in ``request_fields.MESSAGE_FIELDS``; the honoured ones reach
the template (``name``, an assistant's ``tool_calls``, a tool reply's ``tool_call_id`` ...), so a
template that renders tool use sees the whole conversation. As vLLM does for Hugging Face
templates, a tool call's ``arguments`` JSON string becomes a dict, and ``reasoning_content``
(vLLM's older name) becomes ``reasoning``.
"""

from __future__ import annotations

import json
from typing import Any

from jaxpaged.server.errors import bad_request
from jaxpaged.server.field_checks import short
from jaxpaged.server.request_fields import MESSAGE_FIELDS, Treatment, read_fields

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad_request(f"'messages' must be a non-empty list, got {short(value)}", "messages")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object, got {short(message)}", where)
    values = read_fields(message, MESSAGE_FIELDS, where="a chat message", prefix=f"{where}.")
    role = values.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(f"'{where}.role' must be one of {list(CHAT_ROLES)}, got {role!r}",
                          f"{where}.role")
    out = {name: v for name, v in values.items()
           if MESSAGE_FIELDS[name].treatment is Treatment.HONOURED}
    out["content"] = content_text(f"{where}.content", values.get("content"))
    if "reasoning_content" in out:
        out.setdefault("reasoning", out.pop("reasoning_content"))
    if "tool_calls" in out:
        out["tool_calls"] = [_tool_call(f"{where}.tool_calls[{i}]", call)
                             for i, call in enumerate(out["tool_calls"])]
    return out


def content_text(where: str, content: Any) -> str:
    """Text content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_request(f"'{where}[{i}]' must be a text part "
                                  f"({{'type': 'text', 'text': ...}}); only text is supported, "
                                  f"got {short(part)}", f"{where}[{i}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"'{where}' must be a string or a list of text parts, got {short(content)}",
                      where)


def _tool_call(where: str, call: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``{"id", "type": "function", "function": {"name", "arguments": "<json>"}}`` with
    the arguments parsed (Hugging Face tool-use templates expect a dict)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"'{where}.function' must be an object with a 'name', got "
                          f"{short(function)}", f"{where}.function")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise bad_request(f"'{where}.function.arguments' must be a JSON object string, got "
                              f"{short(arguments)}", f"{where}.function.arguments") from None
    return {**call, "function": {**function, "arguments": arguments}}
