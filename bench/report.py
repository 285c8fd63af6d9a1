"""How every benchmark reports: the JSON result on stdout and, with --out DIR, in DIR/NAME."""

from __future__ import annotations

import json
import pathlib
from typing import Any


def emit(result: dict[str, Any], out_dir: pathlib.Path | None, name: str) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(text)
