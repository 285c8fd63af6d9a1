"""The tiny-checkpoint builder writes real Hugging Face checkpoints, and the committed goldens match it.

References are independent of converters/tiny.py: transformers' own config and tokenizer loaders,
tensor names/shapes derived here from the loaded config, and a float64 numpy LLaMA forward pass
checked against the HF-torch golden logits in tests/golden/*.npz.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file

from jaxpaged.converters import tiny

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"
SPEC_NAMES = sorted(tiny.TINY_SPECS)
EXPECTED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: tiny.build_tiny_checkpoint(name, root / name) for name in SPEC_NAMES}


def file_digests(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes a HF LlamaForCausalLM / MistralForCausalLM with `config` holds."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention_bias = getattr(config, "attention_bias", False)
    mlp_bias = getattr(config, "mlp_bias", False)
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        for proj, out_dim in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out), ("o_proj", hidden)):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (out_dim, q_out if proj == "o_proj" else hidden)
            if attention_bias:
                shapes[f"{layer}.self_attn.{proj}.bias"] = (out_dim,)
        for proj, out_dim, in_dim in (("gate_proj", inter, hidden), ("up_proj", inter, hidden),
                                      ("down_proj", hidden, inter)):
            shapes[f"{layer}.mlp.{proj}.weight"] = (out_dim, in_dim)
            if mlp_bias:
                shapes[f"{layer}.mlp.{proj}.bias"] = (out_dim,)
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


# ----------------------------------------------------------------------------------------------
# Files, config, tokenizer


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_checkpoint_loads_with_transformers(built, name):
    spec, directory = tiny.TINY_SPECS[name], built[name]
    for filename in EXPECTED_FILES:
        assert (directory / filename).is_file(), filename
    config = transformers.AutoConfig.from_pretrained(directory)
    assert config.architectures == [spec.architecture]
    assert config.model_type == {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}[spec.architecture]
    assert (config.hidden_size, config.head_dim, config.num_key_value_heads) == (
        spec.hidden_size, spec.head_dim, spec.num_key_value_heads)
    assert config.tie_word_embeddings == spec.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == spec.rope_theta
    assert config.rope_parameters["rope_type"] == (spec.rope_scaling or {}).get("rope_type", "default")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert config.vocab_size % 64 == 0 and len(tokenizer) <= config.vocab_size < len(tokenizer) + 64
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.bos_token_id == config.bos_token_id
    assert tokenizer.eos_token == "<|end_of_text|>" and tokenizer.eos_token_id == config.eos_token_id
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["bos_token_id"] == config.bos_token_id
    assert generation["eos_token_id"] == [config.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_tensor_names_and_shapes_match_config(built, name):
    config = transformers.AutoConfig.from_pretrained(built[name])
    with safe_open(built[name] / "model.safetensors", framework="numpy") as f:
        actual = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        assert f.metadata() == {"format": "pt"}
    assert actual == expected_shapes(config)
    tensors = load_file(built[name] / "model.safetensors")
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())


def test_tokenizer_round_trips_multibyte_text(built):
    tokenizer = transformers.AutoTokenizer.from_pretrained(built[tiny.DEFAULT_TINY_MODEL])
    for text in ("héllo ☃ 日本", "emoji 🦙 and tabs\tand\nnewlines", "The cat sat.", ""):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(ids) == "<|begin_of_text|>" + text
    assert 300 <= len(tokenizer) <= 512


def test_chat_template_renders_generation_prompt(built):
    tokenizer = transformers.AutoTokenizer.from_pretrained(built[tiny.DEFAULT_TINY_MODEL])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text.startswith(without) and without.endswith("<|eot_id|>")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.convert_tokens_to_ids("<|start_header_id|>")) == 3


def test_build_is_byte_identical_across_processes(built, tmp_path):
    tiny.build_tiny_checkpoint(tiny.DEFAULT_TINY_MODEL, tmp_path / "again")
    script = ("import sys; from jaxpaged.converters.tiny import build_tiny_checkpoint; "
              f"build_tiny_checkpoint({tiny.DEFAULT_TINY_MODEL!r}, sys.argv[1])")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other")], check=True,
                   env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"})
    reference = file_digests(built[tiny.DEFAULT_TINY_MODEL])
    assert file_digests(tmp_path / "again") == reference
    assert file_digests(tmp_path / "other") == reference


# ----------------------------------------------------------------------------------------------
# Sharding, bf16, bad input, cache


def test_sharded_output_has_a_correct_index(built, tmp_path):
    name = "llama-gqa"
    directory = tiny.build_tiny_checkpoint(name, tmp_path / "sharded", shards=3)
    assert not (directory / "model.safetensors").exists()
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in directory.glob("model-*.safetensors"))
    assert shard_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    reference = load_file(built[name] / "model.safetensors")
    assert set(index["weight_map"]) == set(reference)
    merged = {}
    for shard in shard_files:
        tensors = load_file(directory / shard)
        assert tensors, shard
        assert {key for key, f in index["weight_map"].items() if f == shard} == set(tensors)
        merged.update(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in reference.values())
    for key, value in reference.items():
        np.testing.assert_array_equal(merged[key], value)
    config = transformers.AutoConfig.from_pretrained(directory)
    assert {k: v.shape for k, v in merged.items()} == expected_shapes(config)


def test_bf16_output(built, tmp_path):
    name = "llama-bias"
    directory = tiny.build_tiny_checkpoint(name, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((directory / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    with safe_open(directory / "model.safetensors", framework="numpy") as f:
        header_dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    assert header_dtypes == {"BF16"}
    bf16, fp32 = load_file(directory / "model.safetensors"), load_file(built[name] / "model.safetensors")
    for key, value in fp32.items():
        np.testing.assert_array_equal(bf16[key], value.astype(ml_dtypes.bfloat16))


def test_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"old")
    with pytest.raises(ValueError, match="out_dir"):
        tiny.build_tiny_checkpoint("llama-mha", tmp_path)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"spec_or_name": "gpt2"}, "spec_or_name"),
    ({"dtype": "float16"}, "dtype"),
    ({"shards": 0}, "shards"),
    ({"shards": 10_000}, "shards"),
])
def test_bad_build_arguments_raise(tmp_path, kwargs, field):
    arguments = {"spec_or_name": "llama-mha", "out_dir": tmp_path} | kwargs
    with pytest.raises(ValueError, match=field):
        tiny.build_tiny_checkpoint(**arguments)


@pytest.mark.parametrize(("changes", "field"), [
    ({"architecture": "GPT2LMHeadModel"}, "architecture"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 0}, "head_dim"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
    ({"architecture": "MistralForCausalLM", "attention_bias": True}, "attention_bias"),
])
def test_bad_spec_raises(changes, field):
    fields = dict(name="bad", architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16) | changes
    with pytest.raises(ValueError, match=field):
        tiny.TinySpec(**fields)


def test_tiny_model_dir_builds_once_and_rebuilds_when_stale(built, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path))
    directory = tiny.tiny_model_dir()
    assert directory == tmp_path / "tiny" / tiny.DEFAULT_TINY_MODEL
    digests = file_digests(directory)
    assert {k: v for k, v in digests.items() if k in EXPECTED_FILES} == file_digests(built[tiny.DEFAULT_TINY_MODEL])
    mtime = (directory / "model.safetensors").stat().st_mtime_ns
    assert tiny.tiny_model_dir() == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime  # cached, not rebuilt
    (directory / "model.safetensors").write_bytes(b"corrupt")
    (directory / "jaxpaged_tiny_stamp.txt").write_text("stale")
    assert tiny.tiny_model_dir() == directory
    assert file_digests(directory) == digests
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [tiny.DEFAULT_TINY_MODEL]  # no leftovers


# ----------------------------------------------------------------------------------------------
# Goldens


def load_golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / f"{name}.npz", allow_pickle=False) as data:
        return dict(data)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_goldens_match_a_fresh_build(built, name):
    golden = load_golden(name)
    directory = built[name]
    assert str(golden["model_sha256"]) == hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert {"torch", "transformers"} <= set(json.loads(str(golden["versions"])))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    vocab_size = transformers.AutoConfig.from_pretrained(directory).vocab_size
    lengths = []
    for i in range(3):
        ids = golden[f"prompt_ids_{i}"]
        assert ids.tolist() == tokenizer(str(golden[f"prompt_text_{i}"]))["input_ids"]
        assert golden[f"prompt_logits_{i}"].shape == (len(ids), vocab_size)
        greedy = golden[f"greedy_ids_{i}"]
        assert greedy.shape == (32,) and greedy.max() < len(tokenizer)
        # The first greedy token is the argmax of the last prompt position's logits.
        assert greedy[0] == golden[f"prompt_logits_{i}"][-1].argmax()
        assert (golden[f"greedy_margins_{i}"] > 1e-3 * golden[f"greedy_logit_scale_{i}"]).all()
        lengths.append(len(ids))
    assert min(lengths) <= 20 and max(lengths) > 32  # one prompt spans more than two 16-token blocks


def numpy_inverse_frequencies(config: dict) -> np.ndarray:
    """Rotary inverse frequencies [D/2] for default, linear and llama3 rope_scaling, in float64."""
    head_dim, scaling = config["head_dim"], config["rope_scaling"] or {"rope_type": "default"}
    inv_freq = config["rope_theta"] ** -(np.arange(0, head_dim, 2) / head_dim)
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        old_context, factor = scaling["original_max_position_embeddings"], scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * np.pi / inv_freq
        smooth = np.clip((old_context / wavelength - low) / (high - low), 0.0, 1.0)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def numpy_llama_logits(weights: dict[str, np.ndarray], config: dict, ids: np.ndarray) -> np.ndarray:
    """Float64 causal LM forward over one sequence: logits [T, V] (split-half RoPE, as HF)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    eps, head_dim = config["rms_norm_eps"], config["head_dim"]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    def rms_norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    def linear(x, prefix):
        return x @ w[f"{prefix}.weight"].T + w.get(f"{prefix}.bias", 0.0)

    def rope(x):  # [T, H, D]
        angles = np.arange(len(ids))[:, None] * numpy_inverse_frequencies(config)[None]  # [T, D/2]
        cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    steps = len(ids)
    x = w["model.embed_tokens.weight"][ids]  # [T, H]
    causal = np.tril(np.ones((steps, steps), dtype=bool))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = rms_norm(x, w[f"{p}.input_layernorm.weight"])
        q = rope(linear(h, f"{p}.self_attn.q_proj").reshape(steps, n_heads, head_dim))
        k = rope(linear(h, f"{p}.self_attn.k_proj").reshape(steps, n_kv, head_dim))
        v = linear(h, f"{p}.self_attn.v_proj").reshape(steps, n_kv, head_dim)
        k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)  # [T, Hq, D]
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim)
        scores = np.where(causal[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attention = np.einsum("hqk,khd->qhd", probs, v).reshape(steps, n_heads * head_dim)
        x = x + linear(attention, f"{p}.self_attn.o_proj")
        h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"])
        gate = linear(h, f"{p}.mlp.gate_proj")
        x = x + linear(gate / (1 + np.exp(-gate)) * linear(h, f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj")
    head = w["model.embed_tokens.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    return rms_norm(x, w["model.norm.weight"]) @ head.T


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_numpy_reference_reproduces_golden_logits(built, name):
    golden = load_golden(name)
    config = json.loads((built[name] / "config.json").read_text())
    weights = load_file(built[name] / "model.safetensors")
    for i in range(3):
        expected = golden[f"prompt_logits_{i}"]  # [T, V] from HF on torch
        actual = numpy_llama_logits(weights, config, golden[f"prompt_ids_{i}"])
        assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()
