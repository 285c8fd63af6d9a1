"""The model's recommended sampling defaults, applied over HTTP to the fields a request omits
(vLLM's rule, ``ModelConfig.get_diff_sampling_param`` and ``get_max_tokens``).

Where the defaults come from is ``EngineConfig.generation_config``: "auto" takes the model's
``generation_config.json`` (already read by the engine), "vllm" takes none, any other value is a
directory holding a ``generation_config.json``; ``override_generation_config`` goes on top. Only
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and ``max_new_tokens``
are read, as vLLM does. A request's own value always wins; ``max_new_tokens`` is the fallback of a
request without ``max_tokens`` (chat: completions default to 16, as OpenAI), and caps every
request when it comes from a directory or the override (vLLM's ``override_max_tokens``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    sampling: Mapping[str, float | int] = dataclasses.field(default_factory=dict)
    """Defaults of the sampling fields a request leaves out (SAMPLING_KEYS)."""
    max_tokens: int | None = None
    """``max_tokens`` of a request that gives none (None: up to the context length)."""
    max_tokens_cap: int | None = None
    """Upper bound on every request's ``max_tokens``."""

    def resolve_max_tokens(self, requested: int | None) -> int | None:
        value = requested if requested is not None else self.max_tokens
        if self.max_tokens_cap is None:
            return value
        return self.max_tokens_cap if value is None else min(value, self.max_tokens_cap)


def generation_defaults(mode: str, override: Mapping[str, Any] | None,
                        model_generation_config: Mapping[str, Any]) -> GenerationDefaults:
    """The defaults for ``EngineConfig.generation_config`` = ``mode`` ("auto", "vllm" or a
    directory), ``override`` and the model's own ``generation_config.json`` contents."""
    if mode == "auto":
        source: Mapping[str, Any] = model_generation_config
    elif mode == "vllm":
        source = {}
    else:
        source = _read_dir(mode)
    merged = {**source, **(override or {})}
    sampling = {k: merged[k] for k in SAMPLING_KEYS if merged.get(k) is not None}
    max_new = merged.get("max_new_tokens")
    from_override = (override or {}).get("max_new_tokens")
    cap = max_new if mode not in ("auto", "vllm") else from_override
    defaults = GenerationDefaults(sampling=sampling, max_tokens=max_new, max_tokens_cap=cap)
    if sampling or max_new is not None:
        logger.info("default sampling parameters from the generation config: %s%s (a request's "
                    "own values win; --generation-config vllm turns this off)", sampling,
                    f", max_tokens={max_new}" if max_new is not None else "")
    return defaults


def _read_dir(directory: str) -> dict[str, Any]:
    path = pathlib.Path(directory).expanduser() / "generation_config.json"
    if not path.is_file():
        raise ValueError(f"generation_config={directory!r}: no generation_config.json there "
                         "(use 'auto' for the model's own, 'vllm' for none)")
    return json.loads(path.read_text())
