"""Tokenizer loading: Hugging Face tokenizers from the model directory, never from a hub."""

from __future__ import annotations

import pathlib
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
