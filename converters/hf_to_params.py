"""Map Hugging Face LLaMA tensors onto jaxpaged's parameter tree (the nnx state as a pure dict).

Every expected tensor must appear exactly once with its expected shape; a missing, unknown,
duplicate or mis-shaped tensor is a ``ValueError`` that names it. HF's split-half RoPE is kept, so
q/k need no permutation. See ``jaxpaged.models.llama`` for the target layout.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np

from jaxpaged.models.config import ModelConfig

from jaxpaged.converters.hf_reader import iter_tensors
from jaxpaged.converters.kv_scales import kv_scale_key

DTYPES = {"bf16": ml_dtypes.bfloat16, "bfloat16": ml_dtypes.bfloat16,
          "fp32": np.float32, "float32": np.float32}

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def numpy_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return np.dtype(DTYPES[name])


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF checkpoint of this config holds, with its (out, in) shape."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.num_heads * d, h),
        "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
        "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
        "self_attn.o_proj.weight": (h, cfg.num_heads * d),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    if cfg.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": (cfg.num_heads * d,),
                          "self_attn.k_proj.bias": (cfg.num_kv_heads * d,),
                          "self_attn.v_proj.bias": (cfg.num_kv_heads * d,),
                          "self_attn.o_proj.bias": (h,)})
    if cfg.mlp_bias:
        per_layer.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,),
                          "mlp.down_proj.bias": (h,)})
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for layer in range(cfg.num_layers):
        shapes.update({f"model.layers.{layer}.{k}": v for k, v in per_layer.items()})
    return shapes


def params_from_hf(model_dir: str | pathlib.Path, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """Reads an HF checkpoint into jaxpaged's parameter tree of numpy arrays in ``dtype``."""
    return params_from_tensors(iter_tensors(pathlib.Path(model_dir)), cfg, dtype)


def params_from_tensors(tensors: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig,
                        dtype: str) -> dict[str, Any]:
    """(HF name, array) pairs -> jaxpaged's parameter tree of numpy arrays in ``dtype``."""
    target = numpy_dtype(dtype)
    expected = expected_hf_shapes(cfg)
    builder = _TreeBuilder(cfg, target)
    seen: set[str] = set()
    for name, array in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or kv_scale_key(name) is not None:
            continue  # KV scales belong to the KV cache: converters.kv_scales reads them
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head (some exporters still write it)
        if name not in expected:
            raise ValueError(f"unknown tensor {name!r} for {cfg.architecture} "
                             f"with this config.json")
        if tuple(array.shape) != expected[name]:
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, "
                             f"expected {expected[name]}")
        builder.put(name, np.asarray(array))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"missing tensor(s) {', '.join(map(repr, missing[:5]))}{more}")
    return builder.tree


class _TreeBuilder:
    """Preallocates the stacked arrays and fills them one HF tensor at a time."""

    def __init__(self, cfg: ModelConfig, dtype: np.dtype):
        self.cfg, self.dtype = cfg, dtype
        n, h, hkv, g, d, i = (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads,
                              cfg.queries_per_kv, cfg.head_dim, cfg.intermediate_size)
        z = lambda *shape: np.zeros(shape, dtype)  # noqa: E731
        attn = {"wqkv": z(n, h, hkv, g + 2, d), "wo": z(n, cfg.num_heads * d, h)}
        if cfg.attention_bias:
            attn.update(bqkv=z(n, hkv, g + 2, d), bo=z(n, h))
        mlp = {"w_gate_up": z(n, h, 2, i), "w_down": z(n, i, h)}
        if cfg.mlp_bias:
            mlp.update(b_gate_up=z(n, 2, i), b_down=z(n, h))
        self.tree: dict[str, Any] = {
            "embed": None,
            "layers": {"input_norm": {"weight": z(n, h)}, "attn": attn,
                       "post_attn_norm": {"weight": z(n, h)}, "mlp": mlp},
            "final_norm": {"weight": None},
        }
        if not cfg.tie_word_embeddings:
            self.tree["lm_head"] = None

    def put(self, name: str, w: np.ndarray) -> None:
        w = w.astype(self.dtype)
        if name == "model.embed_tokens.weight":
            self.tree["embed"] = w
        elif name == "model.norm.weight":
            self.tree["final_norm"]["weight"] = w
        elif name == "lm_head.weight":
            self.tree["lm_head"] = np.ascontiguousarray(w.T)
        else:
            match = _LAYER_KEY.fullmatch(name)
            self._put_layer(int(match.group(1)), match.group(2), w)

    def _put_layer(self, layer: int, key: str, w: np.ndarray) -> None:
        cfg, layers = self.cfg, self.tree["layers"]
        attn, mlp = layers["attn"], layers["mlp"]
        g, d = cfg.queries_per_kv, cfg.head_dim
        module, _, kind = key.rpartition(".")  # e.g. "self_attn.q_proj", "weight"
        if module == "input_layernorm":
            layers["input_norm"]["weight"][layer] = w
        elif module == "post_attention_layernorm":
            layers["post_attn_norm"]["weight"][layer] = w
        elif module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            # rows (out features) are heads: q head h = kv_head * G + g
            heads = w.reshape(cfg.num_kv_heads, -1, d, *w.shape[1:])  # [Hkv, G or 1, D, (H)]
            slot = {"self_attn.q_proj": slice(0, g), "self_attn.k_proj": slice(g, g + 1),
                    "self_attn.v_proj": slice(g + 1, g + 2)}[module]
            if kind == "weight":
                attn["wqkv"][layer][:, :, slot, :] = heads.transpose(3, 0, 1, 2)
            else:
                attn["bqkv"][layer][:, slot, :] = heads
        elif module == "self_attn.o_proj":
            if kind == "weight":
                attn["wo"][layer] = w.T
            else:
                attn["bo"][layer] = w
        elif module in ("mlp.gate_proj", "mlp.up_proj"):
            which = 0 if module == "mlp.gate_proj" else 1
            if kind == "weight":
                mlp["w_gate_up"][layer][:, which, :] = w.T
            else:
                mlp["b_gate_up"][layer][which] = w
        elif module == "mlp.down_proj":
            if kind == "weight":
                mlp["w_down"][layer] = w.T
            else:
                mlp["b_down"][layer] = w
