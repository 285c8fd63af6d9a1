"""Map Hugging Face LLaMA tensors onto jaxpaged's parameter tree (the nnx state as a pure dict).

Every expected tensor must appear exactly once with its expected shape; a missing, unknown,
duplicate or mis-shaped tensor is a ``ValueError`` that names it. HF's split-half RoPE is kept, so
q/k need no permutation. See ``jaxpaged.models.llama`` for the target layout.

Pre-quantized FP8 checkpoints (``quantized=True``; ``converters.quant_config`` reads which
layout): each projection's ``weight`` holds E4M3 codes, kept as they are (output-major, the
layout ``pallas_kernels.quant_matmul`` reads, as HF stores them), and its
``weight_scale`` (per tensor: a scalar or [1]; per channel: [out] or [out, 1]) becomes the
per-output-channel scales of the tree (a per-tensor scale repeated over its module's rows: q, k
and v, gate and up keep their own scales in the fused weights). ``input_scale`` (static
activation scales) is checked and not used (``quant_config`` says why).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np

from jaxpaged.converters.hf_reader import iter_tensors
from jaxpaged.converters.kv_scales import kv_scale_key
from jaxpaged.models.config import ModelConfig
from jaxpaged.models.linear import QUANTIZED_WEIGHTS

DTYPES = {"bf16": ml_dtypes.bfloat16, "bfloat16": ml_dtypes.bfloat16,
          "fp32": np.float32, "float32": np.float32}

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


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


def params_from_hf(model_dir: str | pathlib.Path, cfg: ModelConfig, dtype: str, *,
                   quantized: bool = False) -> dict[str, Any]:
    """Reads an HF checkpoint into jaxpaged's parameter tree of numpy arrays in ``dtype``
    (``quantized``: a pre-quantized FP8 checkpoint; its projections stay codes + scales)."""
    return params_from_tensors(iter_tensors(pathlib.Path(model_dir)), cfg, dtype,
                               quantized=quantized)


def _quantized_expected(cfg: ModelConfig, expected: dict[str, tuple[int, ...]]) -> set[str]:
    """The ``weight_scale`` names of a pre-quantized checkpoint (one per projection)."""
    return {name + "_scale" for name in expected
            if any(name.endswith(f"{m}.weight") for m in _PROJECTIONS)}


def params_from_tensors(tensors: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig,
                        dtype: str, *, quantized: bool = False) -> dict[str, Any]:
    """(HF name, array) pairs -> jaxpaged's parameter tree of numpy arrays in ``dtype``."""
    target = numpy_dtype(dtype)
    expected = expected_hf_shapes(cfg)
    scales = _quantized_expected(cfg, expected) if quantized else set()
    builder = _TreeBuilder(cfg, target, quantized=quantized)
    seen: set[str] = set()
    for name, array in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or kv_scale_key(name) is not None:
            continue  # KV scales belong to the KV cache: converters.kv_scales reads them
        if quantized and name.endswith(".input_scale") and \
                name[:-len("input_scale")] + "weight_scale" in scales:
            _check_per_tensor(name, array)
            continue  # static activation scales: not used (converters.quant_config)
        if name in scales:
            out_rows = expected[name[:-len("_scale")]][0]
            builder.put_scale(name, _channel_scales(name, np.asarray(array), out_rows))
            seen.add(name)
            continue
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
    missing = sorted((set(expected) | scales) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"missing tensor(s) {', '.join(map(repr, missing[:5]))}{more}")
    return builder.finish()


def _check_per_tensor(name: str, array: np.ndarray) -> None:
    if np.asarray(array).size != 1:
        raise ValueError(f"tensor {name!r} must be a per-tensor scale, got shape "
                         f"{tuple(np.shape(array))}")


def _channel_scales(name: str, scale: np.ndarray, out_rows: int) -> np.ndarray:
    """A ``weight_scale`` (per tensor or per output channel) -> f32[out_rows]."""
    if scale.size == 1:
        return np.full((out_rows,), float(scale.reshape(())), np.float32)
    if scale.shape in ((out_rows,), (out_rows, 1)):
        return scale.reshape(out_rows).astype(np.float32)
    raise ValueError(f"tensor {name!r} has shape {tuple(scale.shape)}: expected a per-tensor "
                     f"scale or one per output channel ({out_rows},) / ({out_rows}, 1)")


class _TreeBuilder:
    """Preallocates the stacked arrays and fills them one HF tensor at a time."""

    def __init__(self, cfg: ModelConfig, dtype: np.dtype, *, quantized: bool = False):
        self.cfg, self.dtype, self.quantized = cfg, dtype, quantized
        n, h, hkv, g, d, i = (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads,
                              cfg.queries_per_kv, cfg.head_dim, cfg.intermediate_size)
        z = lambda *shape: np.zeros(shape, dtype)  # noqa: E731
        w = (lambda *shape: np.zeros(shape, FP8)) if quantized else z  # noqa: E731
        attn = {"wqkv": w(n, h, hkv, g + 2, d), "wo": w(n, cfg.num_heads * d, h)}
        if cfg.attention_bias:
            attn.update(bqkv=z(n, hkv, g + 2, d), bo=z(n, h))
        mlp = {"w_gate_up": w(n, h, 2, i), "w_down": w(n, i, h)}
        if quantized:
            f32 = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
            attn.update(wqkv_scale=f32(n, hkv, g + 2, d), wo_scale=f32(n, h))
            mlp.update(w_gate_up_scale=f32(n, 2, i), w_down_scale=f32(n, h))
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
        if self.quantized and any(name.endswith(f"{m}.weight") for m in _PROJECTIONS):
            if w.dtype != FP8:
                raise ValueError(f"tensor {name!r} of a quantized checkpoint has dtype "
                                 f"{w.dtype}, expected float8_e4m3fn")
        else:
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

    def finish(self) -> dict[str, Any]:
        """The tree; quantized projections' codes turned output-major, ``[L, *out, K]``
        (``pallas_kernels.quant_matmul``'s layout), as contiguous arrays."""
        if self.quantized:
            for group in (self.tree["layers"]["attn"], self.tree["layers"]["mlp"]):
                for key in QUANTIZED_WEIGHTS:
                    if key in group:
                        group[key] = np.ascontiguousarray(np.moveaxis(group[key], 1, -1))
        return self.tree

    def put_scale(self, name: str, scale: np.ndarray) -> None:
        """A projection's f32[out] scales, laid out like its weight's output axes."""
        match = _LAYER_KEY.fullmatch(name)
        layer, module = int(match.group(1)), match.group(2).rpartition(".")[0]
        cfg, attn, mlp = self.cfg, self.tree["layers"]["attn"], self.tree["layers"]["mlp"]
        g, d = cfg.queries_per_kv, cfg.head_dim
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            slot = {"self_attn.q_proj": slice(0, g), "self_attn.k_proj": slice(g, g + 1),
                    "self_attn.v_proj": slice(g + 1, g + 2)}[module]
            attn["wqkv_scale"][layer][:, slot, :] = scale.reshape(cfg.num_kv_heads, -1, d)
        elif module == "self_attn.o_proj":
            attn["wo_scale"][layer] = scale
        elif module in ("mlp.gate_proj", "mlp.up_proj"):
            mlp["w_gate_up_scale"][layer][0 if module == "mlp.gate_proj" else 1] = scale
        else:
            mlp["w_down_scale"][layer] = scale
