"""A model given by name: a local directory, or a Hugging Face hub id (``org/name``) resolved
through ``huggingface_hub.snapshot_download`` as vLLM does. Offline (``HF_HUB_OFFLINE=1``, or no
network) the local Hugging Face cache (``HF_HUB_CACHE``) answers; a model that is neither a
directory nor there is a one-line ValueError."""

from __future__ import annotations

import pathlib
import re

# A hub id: "name" or "org/name" of letters, digits, '-', '_', '.' (not a path like "./x", "/x").
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# What jaxpaged reads from a checkpoint: config, safetensors weights, tokenizer, chat template.
_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_model(model: str) -> str:
    """The directory of ``model``: itself when it is one (or does not look like a hub id, so the
    loader reports the missing directory), else the hub snapshot's local directory."""
    path = pathlib.Path(model).expanduser()
    if path.is_dir() or not _HUB_ID.fullmatch(model) or path.exists():
        return str(path)
    import huggingface_hub
    from huggingface_hub import constants

    try:
        return huggingface_hub.snapshot_download(repo_id=model, allow_patterns=_FILES)
    except Exception as e:  # offline and not cached, no such repo, gated, no network ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"model {model!r} is neither a directory nor in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and the hub did not provide it: {reason}") from None
