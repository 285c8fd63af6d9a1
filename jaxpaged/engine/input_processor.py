"""Requests in: a prompt (text, token ids, or both) and its sampling parameters are tokenized,
validated against the engine's limits and turned into the scheduler's ``Request`` plus the
``RequestState`` the engine reports from. Bad input raises ValueError before anything is queued.

What needs the model happens here, as in vLLM's input processor: ``truncate_prompt_tokens`` cuts
the prompt to its last k tokens, ``bad_words`` are tokenized, token ids of ``logit_bias`` /
``allowed_token_ids`` / bad words are checked against the vocabulary, and ``logprobs`` /
``prompt_logprobs`` (-1: the whole vocabulary) against ``max_logprobs`` (-1: no cap)."""

from __future__ import annotations

import dataclasses
import time

from jaxpaged.core.request import Request
from jaxpaged.engine.request_state import RequestState
from jaxpaged.outputs import RequestMetrics
from jaxpaged.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class InputLimits:
    vocab_size: int
    max_model_len: int
    max_logprobs: int  # -1: up to the whole vocabulary
    eos_token_id: int | None  # the id a request stops at by default
    all_eos_token_ids: tuple[int, ...]  # every id that ends a sequence (sorted)


def logprobs_over_limit(value: int | None, max_logprobs: int, vocab_size: int) -> bool:
    """Whether ``logprobs`` / ``prompt_logprobs`` = ``value`` asks for more than ``max_logprobs``
    allows (vLLM's rule: -1 is the whole vocabulary, and ``max_logprobs=-1`` allows it)."""
    if value is None:
        return False
    wanted = vocab_size if value == -1 else value
    return wanted > (vocab_size if max_logprobs == -1 else max_logprobs)


def truncate_prompt(token_ids: list[int], keep: int | None, *, max_model_len: int, longest: int,
                    side: str = "left") -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the last (``side`` "left") or first ("right") ``keep``
    tokens; -1 keeps ``longest``. ``keep`` of 0, below -1 or above ``max_model_len`` is a
    ValueError naming the field (vLLM's limits)."""
    if keep is None:
        return token_ids
    if keep == 0 or keep < -1 or keep > max_model_len:
        raise ValueError(f"truncate_prompt_tokens must be -1 or in [1, max_model_len="
                         f"{max_model_len}], got {keep}")
    keep = longest if keep == -1 else keep
    if len(token_ids) <= keep:
        return token_ids
    return token_ids[-keep:] if side == "left" else token_ids[:keep]


class InputProcessor:
    def __init__(self, tokenizer, limits: InputLimits,
                 default_params: SamplingParams | None = None):
        self.tokenizer = tokenizer
        self.limits = limits
        # what a request without SamplingParams gets (generation_config.json's defaults)
        self.default_params = default_params if default_params is not None else SamplingParams()

    def process(self, request_id: str, prompt: str | list[int] | None,
                params: SamplingParams | None, *, prompt_token_ids: list[int] | None = None,
                arrival_time: float | None = None, priority: int = 0,
                cache_salt: str | None = None) -> tuple[Request, RequestState]:
        """The request to schedule and the state to report it from; the engine checks that
        ``request_id`` is free."""
        params = params if params is not None else self.default_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params)!r}")
        if prompt_token_ids is not None:
            text, token_ids = prompt, self._tokenize(prompt_token_ids)[1]
        else:
            text, token_ids = self._tokenize(prompt)
        token_ids = self._truncate(token_ids, params.truncate_prompt_tokens)
        self._validate(token_ids, params)
        params = params.clone()
        self._tokenize_bad_words(params)
        params.update_from_generation_config(
            {"eos_token_id": list(self.limits.all_eos_token_ids)}, self.limits.eos_token_id)
        arrival = arrival_time if arrival_time is not None else time.time()
        request = Request(request_id=request_id, prompt_token_ids=token_ids,
                          sampling_params=params, arrival_time=arrival, priority=priority,
                          eos_token_id=self.limits.eos_token_id, cache_salt=cache_salt)
        state = RequestState(request_id, text, token_ids, params,
                             RequestMetrics(arrival_time=arrival),
                             prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        return request, state

    def _tokenize(self, prompt: str | list[int] | None) -> tuple[str | None, list[int]]:
        if prompt is None:
            raise ValueError("a prompt (text or prompt_token_ids) is required")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True)")
            return prompt, list(self.tokenizer.encode(prompt))
        token_ids = list(prompt)
        if not token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        vocab = self.limits.vocab_size
        for t in token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is not in [0, {vocab})")
        return None, token_ids

    def _truncate(self, token_ids: list[int], keep: int | None) -> list[int]:
        """The last ``keep`` prompt tokens; -1: the longest prompt ``_validate`` accepts."""
        max_model_len = self.limits.max_model_len
        return truncate_prompt(token_ids, keep, max_model_len=max_model_len,
                               longest=max_model_len - 1)

    def _tokenize_bad_words(self, params: SamplingParams) -> None:
        if not params.bad_words:
            return
        if self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer (skip_tokenizer_init=True)")
        params.update_from_tokenizer(self.tokenizer)
        self._check_vocab("bad_words", [t for ids in params.bad_words_token_ids for t in ids])

    def _check_vocab(self, name: str, token_ids) -> None:
        vocab = self.limits.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name} holds token ids {bad} outside the vocabulary [0, {vocab})")

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        max_model_len = self.limits.max_model_len
        if len(token_ids) >= max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; with max_model_len="
                             f"{max_model_len} at most {max_model_len - 1} fit")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if logprobs_over_limit(value, self.limits.max_logprobs, self.limits.vocab_size):
                raise ValueError(f"{name}={value} asks for more logprobs than "
                                 f"max_logprobs={self.limits.max_logprobs} allows")
        self._check_vocab("stop_token_ids", params.stop_token_ids)
        self._check_vocab("logit_bias", params.logit_bias or ())
        self._check_vocab("allowed_token_ids", params.allowed_token_ids or ())
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True)")
