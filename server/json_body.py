"""Reading a request body as one JSON object, with a size limit and strict JSON."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from jaxpaged.server.errors import APIError, bad_request


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a dict: 415 unless the content type is JSON (a browser sends a cross-site
    POST without preflight only for form and text types), 413 beyond ``max_bytes``, 400 unless
    it is one JSON object of text."""
    _check_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise bad_request(f"the request body is not valid JSON: {_json_error(e)}",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}",
                          code="invalid_json")
    where = lone_surrogate_path(body)
    if where is not None:
        raise bad_request(f"'{where}' holds a lone UTF-16 surrogate (an escape such as "
                          "\\ud800 without its pair), which is not text", where or None,
                          "invalid_json")
    return body


def lone_surrogate_path(value: Any) -> str | None:
    """The path (``messages[0].content``) of the first string or key in ``value`` holding a
    lone surrogate, which JSON's ``\\uXXXX`` escapes can spell but UTF-8 (and every tokenizer)
    cannot encode; None when every string is text. One pass, no recursion; a path is only
    spelled out for the culprit."""
    # (parent entry or None, key or index, item): the path is rebuilt from the parents
    stack: list[tuple[Any, str | int, Any]] = [(None, "", value)]
    while stack:
        entry = stack.pop()
        item = entry[2]
        if isinstance(item, str):
            if not _is_text(item):
                return _path(entry)
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _is_text(key):
                    return _path(entry) or "(a key)"
                stack.append((entry, key, child))
        elif isinstance(item, list):
            stack.extend((entry, i, child) for i, child in enumerate(item)
                         if isinstance(child, (str, dict, list)))
    return None


def _path(entry: tuple[Any, str | int, Any]) -> str:
    parts: list[str] = []
    while entry is not None and entry[0] is not None:
        key = entry[1]
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
        entry = entry[0]
    return "".join(reversed(parts)).lstrip(".")


def _is_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_error(error: Exception) -> str:
    """What was wrong, in the client's terms (never Python's own advice or internals)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at position {error.pos}"
    if isinstance(error, UnicodeDecodeError):
        return f"it is not UTF-8 text (byte {error.start})"
    if isinstance(error, RecursionError):
        return "it is nested too deeply"
    if "digits" in str(error):  # int('9' * 5000): Python's integer-string limit
        return "a number has too many digits"
    return str(error)  # _reject_constant's "NaN is not JSON"


def _check_content_type(value: str | None) -> None:
    media_type = (value or "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not (
            media_type.startswith("application/") and media_type.endswith("+json")):
        raise APIError(415, f"the request body must be sent as 'content-type: application/json', "
                            f"got {value[:100] if value else 'no content type'!r}",
                       code="unsupported_media_type")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than {max_bytes} bytes",
                    code="request_too_large")
