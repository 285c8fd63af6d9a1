"""GGUF tensors as the Hugging Face LLaMA tensors they were converted from.

llama.cpp names tensors ``token_embd``, ``blk.N.attn_q`` ... and its converter
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reorders the rows of q_proj and k_proj so
that each head's two RoPE halves interleave (llama.cpp rotates adjacent pairs; HF rotates the
first half against the second). jaxpaged keeps HF's split-half RoPE, so those rows are put back
(``unpermute_rope_rows``); every other tensor is only renamed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from jaxpaged.converters.gguf_reader import GGUFFile

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; ValueError for a
    tensor jaxpaged has no place for."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r} for a llama model")
    return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.weight"


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: w [num_heads * head_dim, in] with row (h, i, half)
    -> row (h, half, i), for i < head_dim / 2."""
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"{rows} rows do not split into {num_heads} heads of RoPE pairs")
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def iter_hf_tensors(f: GGUFFile, num_heads: int, num_kv_heads: int
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, f32 array in HF layout) for every tensor of ``f``, one at a time."""
    for name in f.tensor_names:
        target = hf_name(name)
        w = f.dequantize(name)
        if target.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope_rows(w, num_heads)
        elif target.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope_rows(w, num_kv_heads)
        yield target, w
