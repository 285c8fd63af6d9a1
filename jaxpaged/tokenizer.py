"""Tokenizer loading: Hugging Face tokenizers from the model directory, never from a hub."""

from __future__ import annotations

import os
import pathlib

# jaxpaged uses transformers only for tokenizers; its "PyTorch was not found" advice is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402


def load_tokenizer(model_dir: str | pathlib.Path) -> PreTrainedTokenizerBase:
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ValueError(f"no tokenizer in {model_dir} (expected tokenizer.json or tokenizer.model)")
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
