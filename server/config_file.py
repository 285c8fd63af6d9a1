"""``--config FILE.yaml``: vLLM's YAML config file, whose keys are flag names
(``max-model-len: 4096`` or ``max_model_len: 4096``; ``model:`` for the model).

The file's values become the parser's defaults, so a flag on the command line overrides them,
as in vLLM. Each value goes through its flag's own type and choices; an unknown key or a bad
value stops the parse naming the key and the file.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import yaml

_FLAG = "--config"


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """If ``argv`` has ``--config FILE``, the file's values become ``parser``'s defaults."""
    path = _config_path(argv)
    if path is None:
        return
    try:
        parser.set_defaults(**config_defaults(parser, pathlib.Path(path)))
    except ValueError as e:
        parser.error(str(e))


def _config_path(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == _FLAG:
            return argv[i + 1] if i + 1 < len(argv) else None
        if token.startswith(_FLAG + "="):
            return token.split("=", 1)[1]
    return None


def config_defaults(parser: argparse.ArgumentParser, path: pathlib.Path) -> dict[str, Any]:
    """dest -> value for every key of the YAML file at ``path``."""
    if not path.is_file():
        raise ValueError(f"--config {str(path)!r}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--config {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r} must hold a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    defaults = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest == "config":
            raise ValueError(f"--config {str(path)!r}: unknown key {key!r}")
        defaults[dest] = _convert(action, value, f"--config {str(path)!r}: key {key!r}")
    return defaults


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if action.nargs == 0:  # a switch: store_true, or --x / --no-x
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        return [_scalar(action, v, where) for v in values]
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return converted
