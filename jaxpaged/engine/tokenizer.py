"""Tokenizer loading (Hugging Face tokenizers from the model directory, never from a hub) and
each token id's own text."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(model_dir: str | pathlib.Path) -> PreTrainedTokenizerBase:
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ValueError(f"no tokenizer in {model_dir} (expected tokenizer.json or tokenizer.model)")
    from transformers import AutoTokenizer  # imported here: start-up without a tokenizer skips it

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


class TokenTexts:
    """Each token id's own text, ``tokenizer.decode([id])`` (vLLM's ``decoded_token``): context
    free, so decoded once per id and kept (at most the vocabulary). Without a tokenizer every
    text is None."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None):
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        return self.texts((token_id,))[token_id]

    def texts(self, token_ids: Iterable[int], detokenize: bool = True) -> dict[int, str | None]:
        """id -> text for every id of ``token_ids`` (None without a tokenizer or detokenize)."""
        ids = list(dict.fromkeys(token_ids))
        if self._tokenizer is None or not detokenize:
            return dict.fromkeys(ids)
        missing = [i for i in ids if i not in self._texts]
        if missing:
            self._texts.update(zip(missing, self._tokenizer.batch_decode([[i] for i in missing])))
        return {i: self._texts[i] for i in ids}
