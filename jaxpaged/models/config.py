"""Model configuration read from a Hugging Face ``config.json``.

Only what jaxpaged can run exactly is accepted; anything else is a ``ValueError`` that names the
field, so an unsupported checkpoint fails at load time instead of producing wrong text.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_type`` of HF's ``rope_scaling`` / ``rope_parameters``)."""

    rope_type: str  # "linear" or "llama3"
    factor: float
    # llama3 only:
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.json: num_attention_heads ({self.num_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_kv_heads})")

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dir(cls, model_dir: str | pathlib.Path) -> "ModelConfig":
        if not pathlib.Path(model_dir).is_dir():
            raise ValueError(f"model directory {str(model_dir)!r} does not exist")
        path = pathlib.Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"no config.json in {model_dir}")
        return cls.from_hf_dict(json.loads(path.read_text()))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        architecture = _architecture(d)
        _reject_unsupported(d)
        num_heads = d["num_attention_heads"]
        hidden_size = d["hidden_size"]
        rope_theta, rope_scaling = _rope(d)
        return cls(
            architecture=architecture,
            vocab_size=d["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(d.get("eos_token_id")),
        )


def _architecture(d: dict[str, Any]) -> str:
    architectures = d.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"config.json: unsupported architecture {architectures!r}; "
                         f"jaxpaged runs {', '.join(SUPPORTED_ARCHITECTURES)}")
    return architectures[0]


def _reject_unsupported(d: dict[str, Any]) -> None:
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: unsupported hidden_act {d['hidden_act']!r} (only 'silu')")
    if d.get("sliding_window") is not None:
        raise ValueError(f"config.json: sliding_window={d['sliding_window']!r} is not supported "
                         "(only full attention)")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={d['partial_rotary_factor']!r} "
                         "is not supported")


def _rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling, from either transformers-4 keys or transformers-5 ``rope_parameters``."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json: unsupported rope_type {rope_type!r}; "
                         f"jaxpaged supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        raise ValueError(f"config.json: rope scaling {rope_type!r} needs a 'factor'")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    scaling = RopeScaling(rope_type=rope_type, **{k: v for k, v in params.items() if k in fields})
    return theta, scaling


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
