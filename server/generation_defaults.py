"""The model's recommended sampling defaults, applied over HTTP to the fields a request omits
(vLLM's rule, ``ModelConfig.get_diff_sampling_param`` and ``get_max_tokens``).

The engine resolves where the defaults come from (``EngineConfig.generation_config`` and
``override_generation_config``, ``jaxpaged.engine.generation_defaults``); this module applies
them to requests. A request's own value always wins; ``max_new_tokens`` is the fallback of a
request without ``max_tokens`` (chat: completions default to 16, as OpenAI), and caps every
request when it comes from a directory or the override (vLLM's ``override_max_tokens``).
"""

from __future__ import annotations

import dataclasses
import logging
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


def generation_defaults(engine_defaults: Mapping[str, Any], *,
                        caps_max_tokens: bool) -> GenerationDefaults:
    """The server's defaults from the engine's (``LLMEngine.get_diff_sampling_param()``: the one
    place that reads the generation config). ``caps_max_tokens``: the max_tokens default came from
    a directory or the override, and caps every request (vLLM's ``override_max_tokens``)."""
    sampling = {k: engine_defaults[k] for k in SAMPLING_KEYS if k in engine_defaults}
    max_new = engine_defaults.get("max_tokens")
    defaults = GenerationDefaults(sampling=sampling, max_tokens=max_new,
                                  max_tokens_cap=max_new if caps_max_tokens else None)
    if sampling or max_new is not None:
        logger.info("default sampling parameters from the generation config: %s%s (a request's "
                    "own values win; --generation-config vllm turns this off)", sampling,
                    f", max_tokens={max_new}" if max_new is not None else "")
    return defaults
