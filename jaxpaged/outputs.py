"""What ``LLM.generate`` returns: vLLM's ``RequestOutput`` and ``CompletionOutput``."""

from __future__ import annotations

import dataclasses
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclasses.dataclass
class Logprob:
    """The log-probability of one token (vLLM's ``Logprob``)."""

    logprob: float
    """Natural-log probability of the token."""
    rank: int | None = None
    """1-based rank of the token in the vocabulary distribution."""
    decoded_token: str | None = None
    """The token's text, when detokenized."""


# One dict per position: token id -> its Logprob (the sampled token plus the top-k alternatives).
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt position; the first prompt token has no logprob (None).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclasses.dataclass
class RequestMetrics:
    """Timestamps of one request (seconds since the epoch; ``None`` until they happen)."""

    arrival_time: float
    """When the request reached the engine."""
    last_token_time: float | None = None
    """When the most recent output token was produced."""
    first_scheduled_time: float | None = None
    """When the scheduler first gave the request tokens to compute."""
    first_token_time: float | None = None
    """When the first output token was produced (time to first token = this - arrival_time)."""
    time_in_queue: float | None = None
    """Seconds between arrival and first scheduling."""
    finished_time: float | None = None
    """When the request finished."""


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (vLLM's ``CompletionOutput``)."""

    index: int
    """Which of the request's ``n`` samples this is (0-based)."""
    text: str
    """Generated text (cut at the stop string unless ``include_stop_str_in_output``)."""
    token_ids: list[int]
    """Generated token ids."""
    cumulative_logprob: float | None
    """Sum of the sampled tokens' logprobs, when ``logprobs`` was requested."""
    logprobs: SampleLogprobs | None
    """Per-token logprobs, when ``logprobs`` was requested."""
    finish_reason: FinishReason | None = None
    """"stop" (EOS, stop token, stop string), "length" (max_tokens, context), "abort", or None."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the sequence; None for EOS, length or running."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """The output of one request (vLLM's ``RequestOutput``): its prompt and ``n`` completions."""

    request_id: str
    """The id given to (or generated for) the request."""
    prompt: str | None
    """The prompt text, when the request was given as text."""
    prompt_token_ids: list[int] | None
    """The prompt's token ids."""
    prompt_logprobs: PromptLogprobs | None
    """Per prompt token logprobs, when ``prompt_logprobs`` was requested."""
    outputs: list[CompletionOutput]
    """The generated sequences, ordered by ``index``."""
    finished: bool
    """True once every sequence has finished."""
    metrics: RequestMetrics | None = None
    """Timing of the request."""
    num_cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache."""

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
