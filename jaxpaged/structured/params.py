"""``StructuredOutputsParams``: what a request's output must match (vLLM's class and names,
``vllm/sampling_params.py``). Pure Python: the scheduler side may import it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# The constraint kinds, one of which a StructuredOutputsParams sets.
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclasses.dataclass
class StructuredOutputsParams:
    """One constraint on the output: a JSON schema (``json``, a dict or its JSON text), a regular
    expression, a list of choices, a grammar (Lark or GBNF/EBNF text), any JSON object
    (``json_object=True``). ``structural_tag`` is vLLM's too but not supported (refused)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    """vLLM: do not fall back to another backend; there is one backend, so it changes nothing."""
    disable_any_whitespace: bool = False
    """JSON: no whitespace between tokens (compact JSON). Off by default, as in vLLM: any JSON
    whitespace may come between tokens, in runs of any length, so a model that likes whitespace
    can spend its ``max_tokens`` on it."""
    disable_additional_properties: bool = False
    """JSON: objects without ``additionalProperties`` take no keys besides their properties."""
    whitespace_pattern: str | None = None
    """JSON: the regex of the whitespace allowed between tokens."""
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            what = "none is" if not given else f"{given} are"
            raise ValueError(f"structured_outputs must set exactly one of {list(KINDS)}, but "
                             f"{what} set")
        if self.structural_tag is not None:
            raise ValueError("structured_outputs.structural_tag is not supported by jaxpaged")
        if isinstance(self.json, str):
            try:
                self.json = _loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json must be a JSON schema, got invalid "
                                 f"JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got "
                             f"{self.json!r}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"structured_outputs.regex must be a str, got {self.regex!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of str, "
                                 f"got {self.choice!r}")
            self.choice = list(self.choice)
        if self.grammar is not None and (not isinstance(self.grammar, str)
                                         or not self.grammar.strip()):
            raise ValueError(f"structured_outputs.grammar must be a non-empty str, got "
                             f"{self.grammar!r}")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"structured_outputs.json_object must be True, got "
                             f"{self.json_object!r}")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ValueError(f"structured_outputs.whitespace_pattern must be a str, got "
                             f"{self.whitespace_pattern!r}")
        self._check_json_options()

    def _check_json_options(self) -> None:
        """The JSON-only options are refused with other kinds, and whitespace is set one way."""
        json_options = {"disable_any_whitespace": self.disable_any_whitespace,
                        "disable_additional_properties": self.disable_additional_properties,
                        "whitespace_pattern": self.whitespace_pattern is not None}
        if self.kind not in ("json", "json_object"):
            for name, given in json_options.items():
                if given:
                    raise ValueError(f"structured_outputs.{name} applies to json and "
                                     f"json_object, not to {self.kind}")
        if self.disable_any_whitespace and self.whitespace_pattern is not None:
            raise ValueError("structured_outputs.disable_any_whitespace and whitespace_pattern "
                             "both set the JSON whitespace: set one")

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) is not None)

    def cache_key(self) -> str:
        """Equal for constraints that compile to the same grammar (the grammar cache's key)."""
        return json.dumps([self.kind, getattr(self, self.kind), self.disable_any_whitespace,
                           self.disable_additional_properties, self.whitespace_pattern],
                          sort_keys=True, separators=(",", ":"))


def _loads(text: str) -> Any:
    return json.loads(text)
