"""ModelConfig parsing: what HF config.json variants give, and what is refused by name."""

import json

import pytest

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.rope import inverse_frequencies

BASE = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": [2, 3],
}


def parse(**changes):
    return ModelConfig.from_hf_dict({**BASE, **changes})


def test_defaults_and_derived_fields():
    cfg = parse()
    assert cfg.head_dim == 16 and cfg.queries_per_kv == 2
    assert cfg.eos_token_ids == (2, 3) and cfg.rope_scaling is None
    assert parse(head_dim=32).head_dim == 32
    assert parse(num_key_value_heads=None).num_kv_heads == 4


def test_transformers5_rope_parameters():
    cfg = parse(rope_theta=None, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                  "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.rope_type == "llama3"
    assert parse(rope_parameters={"rope_type": "default", "rope_theta": 1e6}).rope_scaling is None


def test_legacy_rope_scaling_type_key():
    cfg = parse(rope_scaling={"type": "linear", "factor": 2.0})
    assert cfg.rope_scaling.rope_type == "linear"
    plain = inverse_frequencies(16, 10000.0, None)
    assert inverse_frequencies(16, 10000.0, cfg.rope_scaling) == pytest.approx(plain / 2.0)


@pytest.mark.parametrize("changes, names", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"architectures": []}, "architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size"),
])
def test_unsupported_configs_name_the_problem(changes, names):
    with pytest.raises(ValueError, match=names):
        parse(**changes)


def test_mistral_without_sliding_window_is_accepted():
    assert parse(architectures=["MistralForCausalLM"], sliding_window=None).architecture == \
        "MistralForCausalLM"


def test_from_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert ModelConfig.from_dir(tmp_path).num_layers == 2
    with pytest.raises(ValueError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_dir(tmp_path / "empty")
