"""Incremental detokenization: a sequence's output token ids -> text, a few tokens per step.

Each step the engine hands every running sequence its newly sampled token ids; the sequence's
``IncrementalDetokenizer`` extends its text, checks the stop strings, and gives the server the
text that may be streamed so far. The idea follows vLLM's ``v1/engine/detokenizer.py``.

Why not decode each new token alone: with byte-level BPE one character may span several tokens
(a 4-byte emoji can be 2-4 tokens), and decoding a lone piece gives "\\ufffd"; SentencePiece-style
decoders also drop a leading space only at the start of the decoded string. So each step decodes a
small window of ids, ``ids[prefix_offset:]``, and keeps only what the new ids add to the text of
``ids[prefix_offset:read_offset]`` (tokens already turned into text)::

    ids:   ... | prefix_offset ......... read_offset ......... len(ids)
                 <- already emitted ->   <- new, not emitted yet ->

When the window's text ends in "\\ufffd" (a character still incomplete) nothing is emitted and the
new ids wait for the token that completes it. Otherwise the new suffix is emitted, and the emitted
ids become the next window's prefix. Decoding costs O(window) per new id, not O(all output tokens)
(one string append per update remains), and for byte-level BPE the emitted pieces concatenate to
``tokenizer.decode(output_ids)``.

Text is decoded from the output ids alone (not with the prompt as left context), so the output text
equals ``tokenizer.decode(output_token_ids, skip_special_tokens=...)`` of the same ids, as HF
``generate`` users compare it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING


from jaxpaged.sampling_params import SamplingParams

if TYPE_CHECKING:  # transformers loads only when a tokenizer does
    from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what a decoder prints for bytes that are not (yet) a whole character


def find_stop_string(text: str, check_from: int, stop: Sequence[str]) -> tuple[str, int] | None:
    """The stop string that appears first in ``text`` and ends after ``text[:check_from]``.

    Only matches ending in the new text (``text[check_from:]``) are looked for, since the old text
    was checked before. "First" means the match that ends earliest (the one a character-by-character
    stream would complete first); among matches ending at the same place the longest wins.

    Returns ``(stop_string, start_index)`` or ``None``.
    """
    best: tuple[int, int, str] | None = None  # (end, -length, stop string)
    for candidate in stop:
        start = text.find(candidate, max(0, check_from - len(candidate) + 1))
        if start < 0:
            continue
        key = (start + len(candidate), -len(candidate), candidate)
        if best is None or key < best:
            best = key
    if best is None:
        return None
    end, _, matched = best
    return matched, end - len(matched)


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text as they arrive, with stop-string checks.

    Use: ``stop = detok.update(new_ids)`` each step (a non-``None`` result is the stop string that
    ended the sequence), ``detok.get_next_output_text(finished, delta=True)`` for the text to stream,
    ``detok.output_text`` for the text so far.

    Sampling params read (vLLM names): ``stop``, ``include_stop_str_in_output``,
    ``skip_special_tokens``, ``detokenize`` and ``min_tokens`` (stop strings in the text of the
    first ``min_tokens`` tokens are ignored, as in vLLM). ``spaces_between_special_tokens`` has no
    effect: as in vLLM's fast-tokenizer path and ``PreTrainedTokenizerFast.decode``, the
    tokenizer's own decoder decides the spacing (LLaMA's byte-level and SentencePiece decoders put
    no spaces between special tokens).

    Only fast (Rust-backed) tokenizers are accepted; their ``clean_up_tokenization_spaces`` is not
    applied (transformers skips it for BPE tokenizers anyway).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Iterable[int],
                 params: SamplingParams):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not getattr(tokenizer, "is_fast", False) or backend is None:
            raise ValueError(f"tokenizer must be a fast Hugging Face tokenizer (is_fast=True), "
                             f"got {type(tokenizer).__name__}")
        stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
        if stop and not params.detokenize:
            raise ValueError(f"stop strings need detokenize=True, got stop={stop!r} with "
                             f"detokenize=False")
        self._backend = backend
        self._prompt_token_ids = tuple(prompt_token_ids)
        self._detokenize = params.detokenize
        self._skip_special_tokens = params.skip_special_tokens
        self._stop = stop
        self._include_stop_str = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # Characters held back from streaming so that a stop string split across steps is cut
        # before any of it is streamed (vLLM's stop_buffer_length).
        self._stop_buffer_length = (max(len(s) for s in stop) - 1
                                    if stop and not self._include_stop_str else 0)

        self._token_ids: list[int] = []  # every output token id, including ones after a stop
        self._text = ""  # committed output text (ends at the stop string when one matched)
        self._prefix_offset = 0  # window start: ids[prefix_offset:read_offset] are emitted ...
        self._read_offset = 0  # ... and ids[read_offset:] are waiting for their text
        self._prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]); None = stale
        self._stop_string: str | None = None  # the stop string that ended the text, once matched
        self._streamed_chars = 0  # len of the text already returned by delta streaming

    # ------------------------------------------------------------------------------------------
    # Read-only views

    @property
    def output_text(self) -> str:
        """The output text so far: whole characters only, cut at the stop string once one matched."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        """Every output token id passed to ``update`` (a copy), including any after a stop string."""
        return list(self._token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return self._prompt_token_ids

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text, or ``None``."""
        return self._stop_string

    # ------------------------------------------------------------------------------------------
    # Per-step API

    def update(self, new_token_ids: Iterable[int]) -> str | None:
        """Append ``new_token_ids``, extend ``output_text``, and return the stop string if one matched.

        On a match the text is cut at the stop string (kept only with include_stop_str_in_output).
        Once stopped, further ids are recorded but add no text (the engine may have sampled a step
        ahead before it saw the stop), and ``None`` is returned.
        """
        new_ids = _checked_token_ids(new_token_ids)
        if self._stop_string is not None or not self._detokenize:
            self._token_ids.extend(new_ids)
            return None
        # Ids still inside the first min_tokens tokens: their text never triggers a stop.
        num_quiet = min(len(new_ids), max(0, self._min_tokens - len(self._token_ids)))
        if num_quiet:
            self._append_tokens(new_ids[:num_quiet])
            new_ids = new_ids[num_quiet:]
        check_from = len(self._text)
        if not new_ids:
            return None
        self._append_tokens(new_ids)
        return self._apply_stop_strings(check_from) if self._stop else None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text for the client: all of it (``delta=False``) or only what was not returned yet.

        While not finished, the last ``max(len(s) for s in stop) - 1`` characters are held back, so a
        stop string split across steps is never streamed. When finished, the held-back text is
        released, and so are ids still waiting for the rest of a character (their incomplete bytes
        come out as "\\ufffd", as in a full decode).
        """
        if finished:
            self._flush_pending()
        held_back = 0 if finished else self._stop_buffer_length
        visible = max(0, len(self._text) - held_back)
        if not delta:
            return self._text[:visible]
        if visible <= self._streamed_chars:
            return ""
        text = self._text[self._streamed_chars:visible]
        self._streamed_chars = visible
        return text

    # ------------------------------------------------------------------------------------------
    # Internals

    def _append_tokens(self, new_ids: list[int]) -> None:
        # One id at a time, so the whole characters before an incomplete one are not held back.
        token_ids = self._token_ids
        for token_id in new_ids:
            token_ids.append(token_id)
            new_text = self._emit_new_text(final=False)
            if new_text:
                self._text += new_text

    def _emit_new_text(self, final: bool) -> str:
        """Text the waiting ids ``ids[read_offset:]`` add; "" while a character is incomplete.

        With ``final`` the waiting ids are emitted even if their text ends in "\\ufffd".
        """
        ids, prefix_offset, read_offset = self._token_ids, self._prefix_offset, self._read_offset
        if read_offset == len(ids):
            return ""
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._prefix_text = self._decode(ids[prefix_offset:read_offset])
        window_text = self._decode(ids[prefix_offset:])
        grew = len(window_text) > len(prefix_text)
        if not final and (not grew or window_text.endswith(REPLACEMENT_CHAR)):
            return ""  # NOTE: keep the prefix unchanged so the window's context stays valid
        self._prefix_offset, self._read_offset = read_offset, len(ids)
        self._prefix_text = None  # decoded lazily: a final step never needs it
        return window_text[len(prefix_text):]

    def _flush_pending(self) -> None:
        if self._stop_string is not None or not self._detokenize:
            return
        check_from = len(self._text)
        self._text += self._emit_new_text(final=True)
        if len(self._token_ids) > self._min_tokens:
            self._apply_stop_strings(check_from)

    def _apply_stop_strings(self, check_from: int) -> str | None:
        if not self._stop or check_from == len(self._text):
            return None
        match = find_stop_string(self._text, check_from, self._stop)
        if match is None:
            return None
        stop, start = match
        self._text = self._text[:start + len(stop) if self._include_stop_str else start]
        self._stop_string = stop
        return stop

    def _decode(self, token_ids: list[int]) -> str:
        # The Rust tokenizer directly: what PreTrainedTokenizerFast.decode calls, minus its overhead.
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


def _checked_token_ids(token_ids: Iterable[int]) -> list[int]:
    """Token ids as a list of Python ints (numpy ints accepted); ValueError for anything else."""
    try:
        ids = [operator.index(t) for t in token_ids]
    except TypeError:
        raise ValueError(f"new_token_ids must be a sequence of ints, got {token_ids!r}") from None
    if ids and min(ids) < 0:
        raise ValueError(f"new_token_ids must be non-negative, got {ids!r}")
    return ids
