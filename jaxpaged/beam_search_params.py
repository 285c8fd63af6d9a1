"""``BeamSearchParams``: vLLM's parameters of ``LLM.beam_search`` (``vllm.sampling_params``)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class BeamSearchParams:
    """Beam search over ``beam_width`` beams for ``max_tokens`` steps (vLLM's semantics).

    Each step every live beam proposes its ``2 * beam_width`` most likely next tokens; the
    ``beam_width`` best candidates by ``get_beam_search_score`` survive. A candidate ending in EOS
    (unless ``ignore_eos``) leaves the search as a finished sequence; the search itself always runs
    ``max_tokens`` steps, then the ``beam_width`` best of the finished and live beams are returned.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    # Only for the sampled token that joins each beam's candidates (as in vLLM); the candidates
    # are ranked by raw logprobs, so 0.0 (greedy) is the usual choice.
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
