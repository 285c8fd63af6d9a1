"""A GGUF file as a jaxpaged model: its parameter tree and the Hugging Face side files.

Two ways in:
  - ``jaxpaged convert model.gguf OUT`` (``converters.checkpoint.convert``): ``gguf_params`` and
    ``write_model_files`` into a converted checkpoint directory;
  - ``LLM(model="model.gguf")`` / ``jaxpaged serve model.gguf``: ``resolve_model_path`` gives
    the engine a small directory in the cache with only the side files (config.json, tokenizer
    files) and ``jaxpaged_gguf.json`` naming the GGUF; the loader (``gguf_source``) then
    dequantizes the weights from the GGUF itself at every start, so no second copy of the
    weights is kept on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

from jaxpaged.models.config import ModelConfig

from jaxpaged.converters.cache_dir import cache_root, cached_build
from jaxpaged.converters.gguf_config import generation_config, hf_config
from jaxpaged.converters.gguf_reader import GGUFFile
from jaxpaged.converters.gguf_tensors import iter_hf_tensors
from jaxpaged.converters.gguf_tokenizer import build_tokenizer, tokenizer_config
from jaxpaged.converters.hf_to_params import params_from_tensors

SOURCE_FILE = "jaxpaged_gguf.json"
# Bump when write_model_files' output changes, so cached side-file directories get rebuilt.
SIDE_FILES_VERSION = 1


def is_gguf_file(path: str | os.PathLike) -> bool:
    path = pathlib.Path(path)
    return path.suffix.lower() == ".gguf" and path.is_file()


def gguf_params(f: GGUFFile | str | os.PathLike, dtype: str) -> dict[str, Any]:
    """jaxpaged's parameter tree (numpy, ``dtype``) of the model in ``f`` (a GGUF file)."""
    f = f if isinstance(f, GGUFFile) else GGUFFile(f)
    cfg = ModelConfig.from_hf_dict(hf_config(f))
    return params_from_tensors(iter_hf_tensors(f, cfg.num_heads, cfg.num_kv_heads), cfg, dtype)


def write_model_files(f: GGUFFile, out_dir: pathlib.Path) -> None:
    """config.json, generation_config.json, tokenizer.json, tokenizer_config.json from ``f``."""
    _write_json(out_dir / "config.json", hf_config(f))
    _write_json(out_dir / "generation_config.json", generation_config(f))
    (out_dir / "tokenizer.json").write_text(build_tokenizer(f).to_str(), encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(f))


def resolve_model_path(model: str | os.PathLike) -> pathlib.Path:
    """The directory the engine loads: ``model`` itself, or for a ``.gguf`` file its side-file
    directory in the cache (made on first use, remade when the file changes)."""
    path = pathlib.Path(model)
    if not is_gguf_file(path):
        return path
    path = path.resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}:v{SIDE_FILES_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    directory = cache_root() / "gguf" / f"{path.stem}-{digest}"
    return cached_build(directory, key, "jaxpaged_gguf_stamp.txt",
                        lambda out: _write_side_directory(path, out))


def gguf_source(model_dir: str | os.PathLike) -> pathlib.Path | None:
    """The GGUF file a side-file directory stands for, or None for any other directory."""
    source = pathlib.Path(model_dir) / SOURCE_FILE
    if not source.is_file():
        return None
    return pathlib.Path(json.loads(source.read_text())["gguf"])


def _write_side_directory(path: pathlib.Path, out_dir: pathlib.Path) -> None:
    write_model_files(GGUFFile(path), out_dir)
    _write_json(out_dir / SOURCE_FILE, {"gguf": str(path)})


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
