"""Sampling parameters for text generation, with vLLM's names, defaults and checks.

Code written for ``vllm.SamplingParams`` should run unchanged: the same keyword arguments, the same
defaults, the same normalisation (``stop`` becomes a list; greedy sampling switches top-p, top-k
and min-p off; ``logit_bias`` keys become ints and its values are clamped to [-100, 100]).
Bad values raise ``ValueError`` naming the field and the value. Checks that need the model (token
ids inside the vocabulary, ``truncate_prompt_tokens`` against ``max_model_len``) and the
tokenization of ``bad_words`` (``update_from_tokenizer``) happen when the engine takes the request.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import enum
from collections.abc import Mapping
from numbers import Real
from typing import Any

from jaxpaged.structured.params import StructuredOutputsParams

# Temperatures below this are treated as greedy (argmax) sampling, as in vLLM.
SAMPLING_EPS = 1e-5
# vLLM clamps every logit_bias value into [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT].
LOGIT_BIAS_LIMIT = 100.0
# Upper bounds of the numeric fields: each reaches a device tensor (i32 / i64 columns, f32 values),
# so a value beyond them must be refused here, not overflow inside a step. Counts (n, max_tokens,
# min_tokens, top_k, logprobs ...) fit int32; the seed is int64 (vLLM's range); reals are finite in
# float32.
INT32_MAX = 2**31 - 1
# Lists checked every step for every sequence (stop strings against the new text, stop ids and
# bad words in the sampler) are bounded, so one request cannot slow the batch it runs in.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 4096  # all stop strings together
MAX_TOKEN_ID_LIST = 256  # stop_token_ids, bad_words
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38


class SamplingType(enum.IntEnum):
    """How the sampler picks a token for one request (vLLM's ``SamplingType``)."""

    GREEDY = 0  # argmax; temperature < SAMPLING_EPS
    RANDOM = 1  # random sampling from the engine's generator
    RANDOM_SEED = 2  # random sampling from a per-request generator seeded with ``seed``


class RequestOutputKind(enum.Enum):
    """What each ``RequestOutput`` of a request carries (vLLM's ``RequestOutputKind``)."""

    CUMULATIVE = 0  # everything generated so far, every step
    DELTA = 1  # only what is new since the previous output (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclasses.dataclass
class SamplingParams:
    """How to sample the output tokens of one request (vLLM's ``SamplingParams``)."""

    n: int = 1
    """Number of output sequences to return for the prompt."""
    best_of: int | None = None
    """Not supported (vLLM V1 dropped it); only ``None`` is accepted."""
    presence_penalty: float = 0.0
    """Penalises tokens already in the output (> 0: favour new tokens, < 0: repeats). [-2, 2]."""
    frequency_penalty: float = 0.0
    """Penalises tokens by how often they appear in the output. [-2, 2]."""
    repetition_penalty: float = 1.0
    """Multiplicative penalty on tokens in the prompt or output (> 1 discourages repeats). > 0."""
    temperature: float = 1.0
    """Softmax temperature; 0 (below 1e-5) means greedy sampling. >= 0."""
    top_p: float = 1.0
    """Keep the smallest set of top tokens whose probabilities sum to at least ``top_p``. (0, 1]."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens; 0 disables (older vLLM's -1 is stored as 0)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below ``min_p`` times the top token's. [0, 1]."""
    seed: int | None = None
    """Seed of a per-request generator (reproducible sampling); ``None``: the engine's generator."""
    stop: str | list[str] | None = None
    """Strings that stop generation (checked by the detokenizer); normalised to a list."""
    stop_token_ids: list[int] | None = None
    """Token ids that stop generation (kept in the output unless they are special tokens)."""
    ignore_eos: bool = False
    """Keep generating after the EOS token (benchmarks)."""
    max_tokens: int | None = 16
    """Maximum number of generated tokens; ``None`` = up to the model's context length."""
    min_tokens: int = 0
    """Minimum number of generated tokens before EOS / stop tokens may end the request."""
    logprobs: int | None = None
    """Number of log-probabilities to return per generated token (plus the sampled one)."""
    prompt_logprobs: int | None = None
    """Number of log-probabilities to return per prompt token."""
    detokenize: bool = True
    """Whether to turn output token ids into text."""
    skip_special_tokens: bool = True
    """Drop special tokens from the output text."""
    spaces_between_special_tokens: bool = True
    """Put spaces between special tokens in the output text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    """Cumulative outputs every step, deltas for streaming, or only the final output."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to that token's logit before sampling (and before the penalties,
    as in vLLM); values are clamped to [-100, 100], keys may be ints or int strings (JSON)."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be sampled (every other logit becomes -inf); non-empty."""
    bad_words: list[str] | None = None
    """Words that must not be generated. Each is tokenized without and with a leading space; a
    one-token word is never sampled, a longer one bans its last token whenever the tokens
    generated just before match the rest of it (vLLM's rule). Normalised to a list."""
    structured_outputs: StructuredOutputsParams | None = None
    """The output must match this JSON schema / regex / choice / grammar (enforced on the
    device by a token bitmask); a grammar that completes ends the request with "stop"."""
    truncate_prompt_tokens: int | None = None
    """Keep only the last k prompt tokens (k >= 1, at most max_model_len); -1 keeps as many as
    the engine accepts (max_model_len - 1: one position is left for the output)."""

    # Stop token ids plus the model's EOS ids (see ``update_from_generation_config``); the sampler
    # masks these while fewer than ``min_tokens`` tokens have been generated.
    _all_stop_token_ids: set[int] = dataclasses.field(
        default_factory=set, init=False, repr=False, compare=False
    )
    # ``bad_words`` as token sequences (``update_from_tokenizer``); None until tokenized.
    _bad_words_token_ids: list[list[int]] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k == -1:
            self.top_k = 0  # NOTE: -1 is older vLLM's "disabled"; keep one spelling downstream.
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        if isinstance(self.allowed_token_ids, (tuple, set, frozenset)):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is None:
            self.bad_words = []
        elif isinstance(self.bad_words, (list, tuple)):
            self.bad_words = list(dict.fromkeys(self.bad_words))  # vLLM drops repeats
        self._verify_args()
        if self.temperature < SAMPLING_EPS:
            # Greedy sampling: the filters cannot change the argmax, so switch them off.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify_args(self) -> None:
        _check_int("n", self.n, minimum=1)
        if self.best_of is not None:
            raise ValueError(f"best_of is not supported; got best_of={self.best_of!r} (use n)")
        _check_real("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_real("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
            )
        _check_real("temperature", self.temperature, 0.0)
        _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=-1, hint="0 or -1 disables, else >= 1")
        _check_real("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=INT64_MIN, maximum=INT64_MAX)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=-1,
                           hint="non-negative or -1 (the whole vocabulary)")
        self._verify_stop()
        self._verify_token_constraints()
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got "
                             f"{self.structured_outputs!r}")

    def _verify_stop(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a str or a list of str, got {self.stop!r}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop cannot contain an empty string, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got "
                             f"{len(self.stop)}")
        if sum(len(s) for s in self.stop) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings may total at most {MAX_STOP_CHARS} characters, got "
                             f"{sum(len(s) for s in self.stop)}")
        if isinstance(self.stop_token_ids, list) and len(self.stop_token_ids) > MAX_TOKEN_ID_LIST:
            raise ValueError(f"stop_token_ids may hold at most {MAX_TOKEN_ID_LIST} ids, got "
                             f"{len(self.stop_token_ids)}")
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}."
            )

    def _verify_token_constraints(self) -> None:
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not all(
                _is_int(t) and t >= 0 for t in self.allowed_token_ids
            ):
                raise ValueError(f"allowed_token_ids must be a list of non-negative ints, got "
                                 f"{self.allowed_token_ids!r}.")
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty (None allows every token)")
        if not isinstance(self.bad_words, list) or not all(
            isinstance(w, str) for w in self.bad_words
        ):
            raise ValueError(f"bad_words must be a list of str, got {self.bad_words!r}")
        if any(not w for w in self.bad_words):
            raise ValueError(f"bad_words cannot contain an empty string, got {self.bad_words!r}")
        if len(self.bad_words) > MAX_TOKEN_ID_LIST:
            raise ValueError(f"bad_words may hold at most {MAX_TOKEN_ID_LIST} words, got "
                             f"{len(self.bad_words)}")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, minimum=-1,
                       hint=">= 1 or -1")
            if self.truncate_prompt_tokens == 0:
                raise ValueError("truncate_prompt_tokens must be >= 1 or -1, got 0")

    def update_from_tokenizer(self, tokenizer) -> None:
        """Tokenize ``bad_words`` as vLLM does: each word (left-stripped) without a leading space,
        then with one; the spaced form is kept only when it is a different token sequence of the
        same length (its first token differs). A word that tokenizes to nothing is refused."""
        self._bad_words_token_ids = []
        for word in self.bad_words:
            plain = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
            if not plain:
                raise ValueError(f"bad_words entry {word!r} tokenizes to no tokens")
            self._bad_words_token_ids.append(plain)
            spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                self._bad_words_token_ids.append(spaced)

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """``bad_words`` as token sequences, once ``update_from_tokenizer`` ran (else None)."""
        return self._bad_words_token_ids

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def all_stop_token_ids(self) -> set[int]:
        """``stop_token_ids`` plus the model's EOS ids (for min_tokens masking)."""
        return self._all_stop_token_ids

    @property
    def output_text_buffer_length(self) -> int:
        """Characters the detokenizer holds back from streaming so a stop string can be cut."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    def update_from_generation_config(
        self, generation_config: Mapping[str, Any], model_eos_token_id: int | None = None
    ) -> None:
        """Add the EOS ids of the model's ``generation_config.json`` as stop tokens (as vLLM does).

        LLaMA-3 lists several EOS ids there (``<|eot_id|>`` ...); the tokenizer's own EOS
        (``model_eos_token_id``) is handled by the scheduler through ``Request.eos_token_id``.
        """
        if model_eos_token_id is not None:
            self._all_stop_token_ids.add(model_eos_token_id)
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None:
            return
        extra = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        extra.discard(model_eos_token_id)
        if not extra:
            return
        self._all_stop_token_ids.update(extra)
        if not self.ignore_eos:
            self.stop_token_ids = sorted(extra.union(self.stop_token_ids))

    def clone(self) -> SamplingParams:
        """A copy that can be changed without touching this one (keeps the EOS additions)."""
        cloned = copy.copy(self)
        cloned.stop = list(self.stop)
        cloned.stop_token_ids = list(self.stop_token_ids)
        cloned._all_stop_token_ids = set(self._all_stop_token_ids)
        if self.logit_bias is not None:
            cloned.logit_bias = dict(self.logit_bias)
        if self.allowed_token_ids is not None:
            cloned.allowed_token_ids = list(self.allowed_token_ids)
        cloned.bad_words = list(self.bad_words)
        if self._bad_words_token_ids is not None:
            cloned._bad_words_token_ids = [list(ids) for ids in self._bad_words_token_ids]
        return cloned


def _normalise_logit_bias(logit_bias: Any) -> dict[int, float] | None:
    """``{token id: bias}`` with int keys (int strings accepted, as JSON sends them) and values
    clamped to [-100, 100] (vLLM's ``from_optional``); ValueError naming ``logit_bias``."""
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, Mapping):
        raise ValueError(f"logit_bias must be a dict of token id -> float, got {logit_bias!r}")
    normalised = {}
    for key, value in logit_bias.items():
        try:
            token_id = int(key) if not isinstance(key, (bool, float)) else None
        except (TypeError, ValueError):
            token_id = None
        if token_id is None or token_id < 0:
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {key!r}")
        if not isinstance(value, Real) or isinstance(value, bool) or value != value:
            raise ValueError(f"logit_bias[{key!r}] must be a number, got {value!r}")
        normalised[token_id] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(value)))
    return normalised


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int | None = None, hint: str = "",
               maximum: int = INT32_MAX) -> None:
    """An int in [minimum, maximum]; ``maximum`` defaults to int32's (the device columns')."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        detail = hint or f"at least {minimum}"
        raise ValueError(f"{name} must be {detail}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")


def _check_real(name: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    """A real number in [low, high], finite in float32 (the sampler's dtype)."""
    if not isinstance(value, Real) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite float32 number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")

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
