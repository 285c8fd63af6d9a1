"""Small GGUF files for tests, written with ``gguf.GGUFWriter``.

``write_llama_gguf`` turns a tiny Hugging Face checkpoint into the GGUF that llama.cpp's
``convert_hf_to_gguf.py`` would write: tensor names from gguf's own HF -> GGUF name map, q/k
rows permuted for llama.cpp's RoPE (``llama_cpp_permute``, llama.cpp's formula), matrices in
the chosen type (``gguf.quants.quantize``), norms in F32, the config and the byte-level BPE
tokenizer as metadata. ``write_tensors_gguf`` writes bare tensors.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import gguf
import numpy as np
from safetensors.numpy import load_file

Q = gguf.GGMLQuantizationType


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``: split-half RoPE rows -> interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tensors_gguf(path: pathlib.Path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
                       arch: str = "llama") -> pathlib.Path:
    """Tensors given as (float32 values to quantize, or uint8 raw blocks, their type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (data, qtype) in tensors.items():
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            _add_quantized(writer, name, data, qtype)
    _finish(writer)
    return path


def write_llama_gguf(hf_dir: pathlib.Path, path: pathlib.Path, *,
                     qtype: gguf.GGMLQuantizationType = Q.F32, tokenizer_model: str = "gpt2",
                     edit: Callable[[gguf.GGUFWriter], None] | None = None) -> pathlib.Path:
    """The GGUF of the tiny HF checkpoint ``hf_dir``; ``edit`` may add metadata or tensors."""
    config = json.loads((hf_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_config(writer, config)
    _add_tokenizer(writer, hf_dir, config, tokenizer_model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for hf_name, w in load_file(str(hf_dir / "model.safetensors")).items():
        w = w.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, config["num_attention_heads"], config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, config["num_attention_heads"], config["num_key_value_heads"])
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        _add_quantized(writer, name, w, qtype if w.ndim == 2 else Q.F32)
    if edit is not None:
        edit(writer)
    _finish(writer)
    return path


def _add_quantized(writer: gguf.GGUFWriter, name: str, w: np.ndarray,
                   qtype: gguf.GGMLQuantizationType) -> None:
    data = gguf.quants.quantize(w, qtype)  # F32/F16: float arrays; the others: uint8 blocks
    writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)


def _add_config(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def _add_tokenizer(writer: gguf.GGUFWriter, hf_dir: pathlib.Path, config: dict,
                   tokenizer_model: str) -> None:
    """tokenizer.json's vocabulary (padded to the model's vocab_size), merges and special tokens."""
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    special = {t["id"]: t["content"] for t in tokenizer["added_tokens"]}
    by_id = {**{i: t for t, i in vocab.items()}, **special}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config["vocab_size"])]
    types = [gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL
             for i in range(config["vocab_size"])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(True)
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    writer.add_chat_template(tokenizer_config["chat_template"])


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
