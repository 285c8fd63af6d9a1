"""What the sampling-tensor builder takes, and its checks: the ``SamplingParamsLike`` fields a
row is built from, and the ``ValueError``s for out-of-range parameters, token ids outside the
vocabulary and mismatched batch lists (messages name the offending row); and the padding of
per-row lists into ``[B, width]`` arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class SamplingParamsLike(Protocol):
    """The fields of ``jaxpaged.SamplingParams`` (vLLM names) that the sampler reads."""

    temperature: float
    top_p: float
    top_k: int  # 0 or -1: off
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed: int | None
    min_tokens: int
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool
    logprobs: int | None  # None: none; 0: the sampled token's only; -1: the whole vocabulary
    logit_bias: dict[int, float] | None  # token id -> additive bias
    allowed_token_ids: Sequence[int] | None  # None: every token
    bad_words: Sequence[str]  # the words, read only to refuse untokenized ones
    bad_words_token_ids: Sequence[Sequence[int]] | None  # the tokenized bad words


def _check_range(row: int, name: str, value: float, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"params_list[{row}].{name} must be {expected}, got {value!r}")


def validate_params(row: int, p: SamplingParamsLike) -> None:
    """Raises ValueError if a parameter of row ``row`` is out of its range."""
    _check_range(row, "temperature", p.temperature, p.temperature >= 0.0, ">= 0")
    _check_range(row, "top_p", p.top_p, 0.0 < p.top_p <= 1.0, "in (0, 1]")
    _check_range(row, "top_k", p.top_k, p.top_k >= -1, "-1, 0 (off) or positive")
    _check_range(row, "min_p", p.min_p, 0.0 <= p.min_p <= 1.0, "in [0, 1]")
    _check_range(row, "repetition_penalty", p.repetition_penalty, p.repetition_penalty > 0.0, "> 0")
    _check_range(row, "min_tokens", p.min_tokens, p.min_tokens >= 0, ">= 0")
    _check_range(row, "logprobs", p.logprobs, p.logprobs is None or p.logprobs >= -1, "None or >= -1")


def check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    """Raises ValueError, naming ``name``, if an id of ``ids`` is outside [0, vocab_size)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(f"{name} holds token id {int(bad)} outside [0, vocab_size={vocab_size})")


def id_array(ids: Sequence[int]) -> np.ndarray:
    """i64[n]: token ids as a flat numpy array (any sequence of ints), for checks and padding;
    the scheduler's ``core.step_update.as_ids`` makes validated Python lists instead."""
    return np.asarray(ids, np.int64).reshape(-1)


def pad_lists(lists: Sequence[Sequence], row_index: Sequence[int], num_rows: int, width: int,
              dtype=np.int32, fill=-1) -> np.ndarray:
    """[num_rows, width] of ``dtype``: lists[j] at row row_index[j], ``fill`` everywhere else."""
    out = np.full((num_rows, width), fill, dtype)
    for i, values in zip(row_index, lists):
        out[i, :len(values)] = values
    return out


def validate_batch(params_list, prompt_ids_list, output_ids_list, pad_to: int, vocab_size: int) -> None:
    """Raises ValueError unless the batch's lists line up and fit ``pad_to`` rows."""
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if len(params_list) > pad_to:
        raise ValueError(f"params_list has {len(params_list)} rows, more than pad_to={pad_to}")
    if not len(prompt_ids_list) == len(output_ids_list) == len(params_list):
        raise ValueError(
            f"params_list, prompt_ids_list and output_ids_list must have equal lengths, got "
            f"{len(params_list)}, {len(prompt_ids_list)} and {len(output_ids_list)}"
        )


def validate_ids(prompt_ids_list, output_ids_list, vocab_size: int) -> None:
    """Raises ValueError if a prompt or output id of any row is outside the vocabulary."""
    for row, (prompt, output) in enumerate(zip(prompt_ids_list, output_ids_list)):
        check_ids(f"prompt_ids_list[{row}]", id_array(prompt), vocab_size)
        check_ids(f"output_ids_list[{row}]", id_array(output), vocab_size)


def frozen(array: np.ndarray) -> np.ndarray:
    """Mark an array that is reused across steps read-only (a stray write would corrupt them)."""
    array.flags.writeable = False
    return array
