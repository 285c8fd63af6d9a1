"""What ``LLM.beam_search`` returns, and how beams are ranked (vLLM's ``vllm.beam_search``)."""

from __future__ import annotations

import dataclasses

from jaxpaged.outputs import FinishReason, Logprob


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: its tokens (prompt included), the logprobs of each generated step (the beam's
    candidates at that step) and its cumulative logprob."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None  # the generated tokens' text (EOS left out unless asked for)
    finish_reason: FinishReason | None = None  # "stop" (EOS) or "length"
    stop_reason: int | str | None = None  # the EOS id for "stop"


@dataclasses.dataclass
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def get_beam_search_score(tokens: list[int], cumulative_logprob: float,
                          eos_token_id: int | None, length_penalty: float = 1.0) -> float:
    """vLLM's score: ``cum_logprob / len ** length_penalty``, the length counting the prompt and
    not a final EOS."""
    seq_len = len(tokens)
    if eos_token_id is not None and tokens[-1] == eos_token_id:
        seq_len -= 1
    return cumulative_logprob / (seq_len ** length_penalty)
