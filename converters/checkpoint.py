"""jaxpaged's own checkpoint: the parameter tree saved with orbax, beside the HF config/tokenizer
(copied from a Hugging Face directory, or written from a GGUF file's metadata).

Layout of a converted directory::

    OUT_DIR/
      jaxpaged_checkpoint.json   format marker: {"format": 1, "dtype": "bf16"} (and
                                 "quantization": "fp8" | "int8" for quantized projections)
      params/                    orbax StandardCheckpointer tree (see jaxpaged.models.llama)
      kv_scales.json             per-layer fp8 KV-cache scales, when the HF checkpoint has them
      config.json, tokenizer.json, tokenizer_config.json, generation_config.json, ...
"""

from __future__ import annotations

import json
import pathlib
import shutil
from functools import partial
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxpaged.models.config import ModelConfig

from jaxpaged.converters.gguf_model import gguf_params, is_gguf_file, write_model_files
from jaxpaged.converters.gguf_reader import GGUFFile
from jaxpaged.converters.hf_to_params import numpy_dtype, params_from_hf
from jaxpaged.converters.kv_scales import SCALES_FILE, read_kv_scales
from jaxpaged.converters.quant_config import checkpoint_quantization
from jaxpaged.converters.quantized_params import quantize_stacked_on_host
from jaxpaged.pallas_kernels.quant_matmul import validate_format

MARKER = "jaxpaged_checkpoint.json"
FORMAT_VERSION = 1
# Files copied verbatim from the HF directory (those that exist).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")


def is_converted(model_dir: str | pathlib.Path) -> bool:
    return (pathlib.Path(model_dir) / MARKER).is_file()


def convert(src: str | pathlib.Path, out_dir: str | pathlib.Path, *, dtype: str = "bf16",
            quantization: str | None = None) -> None:
    """HF checkpoint directory or GGUF file -> jaxpaged checkpoint directory; ``quantization``
    ("fp8" / "int8") stores the projections' codes and per-output-channel scales, so loading
    needs no quantization pass. A pre-quantized HF checkpoint keeps its codes."""
    src, out_dir = pathlib.Path(src), pathlib.Path(out_dir)
    numpy_dtype(dtype)  # validate before doing any work
    if quantization is not None:
        validate_format(quantization)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output directory {out_dir} exists and is not empty")
    stored = None  # the checkpoint's own quantization (HF only)
    if is_gguf_file(src):
        gguf = GGUFFile(src)
        params, write_side_files = gguf_params(gguf, dtype), partial(write_model_files, gguf)
    else:
        cfg = ModelConfig.from_dir(src)
        stored = checkpoint_quantization(src)
        if stored is not None and quantization not in (None, stored.method):
            raise ValueError(f"quantization={quantization!r} does not match the checkpoint's "
                             f"{stored.method!r} weights in {src}")
        params = params_from_hf(src, cfg, dtype, quantized=stored is not None)
        quantization = stored.method if stored is not None else quantization
        write_side_files = partial(_copy_side_files, src, cfg.num_layers)
    if quantization is not None and stored is None:
        params = quantize_stacked_on_host(params, quantization)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((out_dir / "params").absolute(), params)
    write_side_files(out_dir)
    marker = {"format": FORMAT_VERSION, "dtype": dtype}
    if quantization is not None:
        marker["quantization"] = quantization
    (out_dir / MARKER).write_text(json.dumps(marker))


def _copy_side_files(hf_dir: pathlib.Path, num_layers: int, out_dir: pathlib.Path) -> None:
    """The HF directory's config and tokenizer files, and its fp8 KV scales if it has them."""
    for name in SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
    scales = read_kv_scales(hf_dir, num_layers, converted=False)
    if scales is not None:
        (out_dir / SCALES_FILE).write_text(scales.to_json())


def restore_params(model_dir: str | pathlib.Path, target: Any) -> Any:
    """Restores the parameter tree onto device; ``target`` is a matching tree of
    ``jax.ShapeDtypeStruct`` (with shardings) that sets dtype and placement."""
    model_dir = pathlib.Path(model_dir)
    meta = json.loads((model_dir / MARKER).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{model_dir / MARKER}: unsupported checkpoint format {meta.get('format')!r}")
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata((model_dir / "params").absolute())
        _check_tree(_tree_of(saved), target)
        # Restore in the saved dtype (orbax cannot cast bf16 <-> f32 on restore), then cast.
        as_saved = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, s.dtype,
                                                                  sharding=t.sharding),
                                target, _tree_of(saved))
        params = checkpointer.restore((model_dir / "params").absolute(), as_saved)
    return jax.tree.map(lambda p, t: p.astype(t.dtype), params, target)


def _tree_of(metadata: Any) -> Any:
    """orbax metadata -> plain tree of per-array metadata (shape, dtype)."""
    metadata = getattr(metadata, "item_metadata", metadata)
    return getattr(metadata, "tree", metadata)


def _check_tree(saved: Any, target: Any) -> None:
    saved_paths = {jax.tree_util.keystr(p): leaf.shape
                   for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    target_paths = {jax.tree_util.keystr(p): leaf.shape
                    for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    for path in sorted(set(target_paths) - set(saved_paths)):
        raise ValueError(f"checkpoint is missing tensor {path}")
    for path in sorted(set(saved_paths) - set(target_paths)):
        raise ValueError(f"checkpoint has unknown tensor {path}")
    for path, shape in target_paths.items():
        if tuple(saved_paths[path]) != tuple(shape):
            raise ValueError(f"checkpoint tensor {path} has shape {tuple(saved_paths[path])}, "
                             f"expected {tuple(shape)}")
