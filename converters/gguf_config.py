"""A GGUF file's metadata as the Hugging Face ``config.json`` / ``generation_config.json`` that
jaxpaged's loader reads (``jaxpaged.config.ModelConfig.from_hf_dict``).

Only what jaxpaged runs exactly is mapped; anything else (another architecture, mixture of
experts, partial rotary, per-frequency RoPE factors, YaRN) is a ValueError that names it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxpaged.converters.gguf_reader import Q, GGUFFile

# GGUF ``general.architecture`` -> HF class. llama.cpp writes Mistral checkpoints as "llama" too.
ARCHITECTURES = {"llama": "LlamaForCausalLM"}


def hf_config(f: GGUFFile) -> dict[str, Any]:
    """config.json for the model in ``f``."""
    _check_supported(f)
    heads, hidden = _int(f, "{arch}.attention.head_count"), _int(f, "{arch}.embedding_length")
    head_dim = _int(f, "{arch}.attention.key_length", hidden // heads)
    for key in ("{arch}.attention.value_length", "{arch}.rope.dimension_count"):
        if _int(f, key, head_dim) != head_dim:
            raise ValueError(f"{f.path.name}: {key.format(arch=f.architecture)}="
                             f"{f.get(key)} differs from the head dim {head_dim} (not supported)")
    vocab_size = f.tensor_shape("token_embd.weight")[0]
    if _int(f, "{arch}.vocab_size", vocab_size) != vocab_size:
        raise ValueError(f"{f.path.name}: {f.architecture}.vocab_size={f.get('{arch}.vocab_size')} "
                         f"but token_embd.weight has {vocab_size} rows")
    dtype = _stored_dtype(f)
    return {
        "architectures": [ARCHITECTURES[f.architecture]],
        "model_type": f.architecture,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _int(f, "{arch}.feed_forward_length"),
        "num_hidden_layers": _int(f, "{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(f, "{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _int(f, "{arch}.context_length"),
        "rms_norm_eps": _float32(f.require("{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(f.get("{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(f),
        "tie_word_embeddings": "output.weight" not in f.tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def generation_config(f: GGUFFile) -> dict[str, Any]:
    """generation_config.json: BOS, and every id that ends a turn (EOS, end of turn, end of
    message)."""
    stops = [f.get(key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                    "tokenizer.ggml.eom_token_id")]
    eos = sorted({int(i) for i in stops if i is not None})
    return {"bos_token_id": f.get("tokenizer.ggml.bos_token_id"), "eos_token_id": eos}


def _check_supported(f: GGUFFile) -> None:
    if f.architecture not in ARCHITECTURES:
        raise ValueError(f"{f.path.name}: GGUF architecture {f.architecture!r} is not supported; "
                         f"jaxpaged reads {', '.join(sorted(ARCHITECTURES))}")
    if _int(f, "{arch}.expert_count", 0) > 0:
        raise ValueError(f"{f.path.name}: mixture-of-experts GGUF models "
                         f"({f.architecture}.expert_count={f.get('{arch}.expert_count')}) "
                         "are not supported")
    if "rope_freqs.weight" in f.tensor_names:
        raise ValueError(f"{f.path.name}: per-frequency RoPE factors (tensor 'rope_freqs.weight', "
                         "llama3-style rope scaling) are not supported in GGUF files; convert the "
                         "Hugging Face checkpoint instead")


def _rope_scaling(f: GGUFFile) -> dict[str, Any] | None:
    kind = f.get("{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ValueError(f"{f.path.name}: {f.architecture}.rope.scaling.type={kind!r} is not "
                         "supported (only 'linear' or none)")
    return {"rope_type": "linear", "factor": _float32(f.require("{arch}.rope.scaling.factor"))}


def _stored_dtype(f: GGUFFile) -> str:
    """What ``dtype="auto"`` runs: the matrices' own precision when they are all F16 or all BF16;
    float32 otherwise, since quantized blocks (scale x quant + min, fp16 scales) and F32
    tensors dequantize exactly only to float32."""
    types = {f.tensor_type(n) for n in f.tensor_names if len(f.tensor_shape(n)) == 2}
    if types == {Q.BF16}:
        return "bfloat16"
    if types == {Q.F16}:
        return "float16"
    return "float32"


def _int(f: GGUFFile, key: str, default: int | None = None) -> int:
    value = f.require(key) if default is None else f.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):  # per-layer lists: not supported
        raise ValueError(f"{f.path.name}: GGUF metadata {key.format(arch=f.architecture)}="
                         f"{value!r} is not one integer (not supported)")
    return value


def _float32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06): the value the original config.json held."""
    return float(str(np.float32(value)))
