"""``--chat-template``: a file holding the template, or the template itself (vLLM's rule)."""

from __future__ import annotations

import codecs
import pathlib

_JINJA_CHARS = "{}\n"


def load_chat_template(value: str | None) -> str | None:
    """The template text of ``--chat-template VALUE``: the file's contents when ``VALUE`` is a
    file, else ``VALUE`` itself with its escapes (``\\n``) decoded, when it looks like a template;
    a ValueError for what looks like a path to no file."""
    if value is None:
        return None
    path = pathlib.Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if not any(ch in value for ch in _JINJA_CHARS):
        raise ValueError(f"--chat-template {value!r} looks like a file path, but there is no "
                         "such file (give a file or the template itself)")
    return codecs.decode(value, "unicode_escape")
