"""Tiny LLaMA-family checkpoints in the exact Hugging Face layout, built locally for tests and demos.

Nothing here downloads anything: weights come from a seeded numpy generator and the tokenizer is a
byte-level BPE trained on a small corpus embedded below. The output directory holds what a hub
checkpoint holds (config.json, generation_config.json, model.safetensors or shards plus
model.safetensors.index.json, tokenizer.json, tokenizer_config.json), so the real loading code runs
on it unchanged.

This module imports only the standard library, numpy, safetensors.numpy and tokenizers (ml_dtypes
only when bfloat16 is asked for), so the golden-reference script can import it from a torch venv.

Command line: ``python -m jaxpaged.converters.tiny OUT_DIR [--name llama3-rope] [--dtype bfloat16]
[--shards 2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import zlib
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .cache_dir import cache_root, cached_build

# Bump when the bytes this module writes change, so cached default checkpoints get rebuilt.
BUILDER_VERSION = 1

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
ROPE_TYPES = ("linear", "llama3")
DTYPES = ("float32", "bfloat16")

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, "<|start_header_id|>", "<|end_header_id|>", EOT_TOKEN)
BPE_VOCAB_SIZE = 437  # 256 byte tokens + 181 merges; + 5 special tokens = 442, padded to vocab_size 448
VOCAB_MULTIPLE = 64

# Llama-3 style: the rendered prompt starts with the BOS text, so tokenize it without special tokens.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CORPUS = """\
The small engine reads a prompt, splits it into tokens, and writes the keys and values of every \
token into blocks of memory. Each block holds sixteen tokens. When a request finishes, its blocks \
go back to the pool, and the next request in the queue can use them.
A scheduler decides which requests run in each step. It gives every request a budget of tokens, \
so a long prompt is cut into chunks while short requests keep decoding. Nothing waits for long.
The weather was cold in the morning, but by noon the sun came out over the hills. We walked along \
the river, counted the boats, and talked about the books we had read during the winter.
Numbers matter too: 1, 2, 3, 10, 16, 42, 64, 128, 256, 1024 and 2048 appear in many programs. \
A model with 8 heads and 2 groups shares each key among 4 query heads.
She said, "Write the answer in one sentence." He wrote: the answer is that simple things, done \
well and tested often, are worth more than clever things that nobody can read.
In the evening the city lights turned on one by one. The train left the station at seven, and the \
people inside read, slept, or looked out of the window at the dark fields passing by.
Questions and answers: What is the capital of France? Paris. How many days are in a week? Seven. \
Which is larger, a mouse or an elephant? The elephant, of course, is much larger than the mouse.
The garden behind the old house had apple trees, a small pond with green frogs, and a wooden bench \
where the children sat after school to share bread, cheese, and stories about their friends.
To make tea, boil fresh water, warm the pot, add the leaves, and wait three or four minutes before \
you pour. Good tea needs patience; good code needs tests, clear names, and short functions.
"""


@dataclass(frozen=True)
class TinySpec:
    """Architecture of one tiny checkpoint; every field maps to a Hugging Face config.json key."""

    name: str
    architecture: str  # "LlamaForCausalLM" | "MistralForCausalLM"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # explicit: may differ from hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...} or None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {self.architecture!r}")
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_size % self.num_attention_heads:  # transformers' LlamaConfig rejects this
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.architecture == "MistralForCausalLM" and (self.attention_bias or self.mlp_bias):
            raise ValueError(f"MistralForCausalLM has no biases, got attention_bias={self.attention_bias} "
                             f"mlp_bias={self.mlp_bias}")
        rope_type = (self.rope_scaling or {}).get("rope_type")
        if self.rope_scaling is not None and rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling['rope_type'] must be one of {ROPE_TYPES}, got {rope_type!r}")


TINY_SPECS: dict[str, TinySpec] = {
    spec.name: spec
    # Seeds were picked (tests/golden/make_goldens.py) so that every golden greedy step has a top-2
    # logit margin of at least 0.7% of the logits' std, and no step's argmax is an EOS token.
    for spec in (
        TinySpec(name="llama-mha", architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16, seed=6),
        TinySpec(name="llama-gqa", architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=160,
                 num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                 rms_norm_eps=1e-6, seed=4),
        TinySpec(name="llama3-rope", architecture="LlamaForCausalLM", hidden_size=128, intermediate_size=192,
                 num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=2, head_dim=32,
                 rope_theta=500000.0, max_position_embeddings=512, seed=2,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        TinySpec(name="llama-tied", architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=1, head_dim=16,
                 tie_word_embeddings=True, seed=16),
        TinySpec(name="llama-bias", architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0},
                 seed=9),
        TinySpec(name="mistral", architecture="MistralForCausalLM", hidden_size=64, intermediate_size=192,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 rope_theta=1000000.0, max_position_embeddings=512, seed=9),
    )
}
DEFAULT_TINY_MODEL = "llama3-rope"


# ----------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on CORPUS, special tokens appended after the BPE vocabulary (ids 437-441)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, bos_id)],
        ),
    ])
    return tokenizer


def padded_vocab_size(tokenizer_size: int) -> int:
    return -(-tokenizer_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ----------------------------------------------------------------------------------------------
# Config files


def config_dict(spec: TinySpec, *, vocab_size: int, bos_id: int, eos_id: int, dtype: str) -> dict:
    """config.json as the hub writes it (legacy rope_theta/rope_scaling keys, which transformers 5 reads)."""
    config = {
        "architectures": [spec.architecture],
        "model_type": ARCHITECTURES[spec.architecture],
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if spec.architecture == "LlamaForCausalLM":
        config.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias, pretraining_tp=1)
    else:
        config.update(sliding_window=None)
    return config


def tokenizer_config_dict(spec: TinySpec) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


# ----------------------------------------------------------------------------------------------
# Weights


def tensor_shapes(spec: TinySpec, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names -> shapes; linear weights are (out_features, in_features) as in torch."""
    hidden, q_dim = spec.hidden_size, spec.num_attention_heads * spec.head_dim
    kv_dim, inter = spec.num_key_value_heads * spec.head_dim, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, hidden)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        linears = {"self_attn.q_proj": (q_dim, hidden), "self_attn.k_proj": (kv_dim, hidden),
                   "self_attn.v_proj": (kv_dim, hidden), "self_attn.o_proj": (hidden, q_dim),
                   "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                   "mlp.down_proj": (hidden, inter)}
        for module, shape in linears.items():
            shapes[f"{p}{module}.weight"] = shape
            has_bias = spec.mlp_bias if module.startswith("mlp.") else spec.attention_bias
            if has_bias:
                shapes[f"{p}{module}.bias"] = (shape[0],)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_size, hidden)
    return shapes


def init_tensor(spec: TinySpec, name: str, shape: tuple[int, ...], tokenizer_size: int) -> np.ndarray:
    """Deterministic float32 values, scaled so the logits are far from uniform.

    Each tensor has its own generator seeded by (spec.seed, crc32(name)), so adding biases does not
    change the other weights. Rows of the embedding / lm_head beyond the tokenizer are zero (padding).
    """
    rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
    if name.endswith("norm.weight"):
        values = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith(".bias"):
        values = 0.1 * rng.standard_normal(shape)
    elif name == "model.embed_tokens.weight":
        # Tied: small rows, so the residual stream is not dominated by the input token's own row
        # (which would make the model repeat its input token forever).
        values = rng.standard_normal(shape) * (0.25 if spec.tie_word_embeddings else 1.0)
    elif name == "lm_head.weight":
        values = rng.standard_normal(shape) * (4.0 / np.sqrt(shape[1]))
    else:
        values = rng.standard_normal(shape) * (1.5 / np.sqrt(shape[1]))
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        values[tokenizer_size:] = 0.0
    return values.astype(np.float32)


def cast(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return values
    import ml_dtypes  # only needed for bf16, and absent from some torch venvs

    return values.astype(ml_dtypes.bfloat16)


def split_into_shards(names: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Consecutive groups of roughly equal byte size, none empty."""
    total, groups, current, done = sum(sizes.values()), [], [], 0
    for index, name in enumerate(names):
        current.append(name)
        done += sizes[name]
        remaining_names, remaining_groups = len(names) - index - 1, shards - len(groups) - 1
        if remaining_groups and (done >= total * (len(groups) + 1) / shards or remaining_names == remaining_groups):
            groups.append(current)
            current = []
    groups.append(current)
    return groups


def write_weights(tensors: dict[str, np.ndarray], out_dir: pathlib.Path, shards: int) -> None:
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, out_dir / "model.safetensors", metadata=metadata)
        return
    names = list(tensors)
    groups = split_into_shards(names, {n: tensors[n].nbytes for n in names}, shards)
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, out_dir / filename, metadata=metadata)
        weight_map.update({n: filename for n in group})
    index_json = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    write_json(out_dir / "model.safetensors.index.json", index_json)


# ----------------------------------------------------------------------------------------------
# Public entry points


def write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def resolve_spec(spec_or_name: TinySpec | str) -> TinySpec:
    if isinstance(spec_or_name, TinySpec):
        return spec_or_name
    if spec_or_name not in TINY_SPECS:
        raise ValueError(f"spec_or_name must be a TinySpec or one of {sorted(TINY_SPECS)}, got {spec_or_name!r}")
    return TINY_SPECS[spec_or_name]


def build_tiny_checkpoint(spec_or_name: TinySpec | str, out_dir: str | os.PathLike, *,
                          dtype: str = "float32", shards: int = 1) -> pathlib.Path:
    """Writes a complete Hugging Face checkpoint for `spec_or_name` into `out_dir` and returns its path.

    `out_dir` must be empty or absent. The output is byte-for-byte deterministic. `dtype` is
    "float32" or "bfloat16" (values are drawn in float32 and rounded). `shards > 1` writes
    model-0000i-of-0000n.safetensors plus model.safetensors.index.json instead of model.safetensors.
    """
    spec = resolve_spec(spec_or_name)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    tokenizer = build_tokenizer()
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = padded_vocab_size(tokenizer_size)
    shapes = tensor_shapes(spec, vocab_size)
    if not 1 <= shards <= len(shapes):
        raise ValueError(f"shards must be in [1, {len(shapes)}] for {spec.name}, got {shards}")
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()):  # leftovers of another layout would make it ambiguous
        raise ValueError(f"out_dir must be empty or absent, got non-empty {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: cast(init_tensor(spec, name, shape, tokenizer_size), dtype) for name, shape in shapes.items()}
    write_weights(tensors, out, shards)
    bos_id, eos_id, eot_id = (tokenizer.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, EOT_TOKEN))
    write_json(out / "config.json", config_dict(spec, vocab_size=vocab_size, bos_id=bos_id, eos_id=eos_id, dtype=dtype))
    write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": [eos_id, eot_id]})
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    write_json(out / "tokenizer_config.json", tokenizer_config_dict(spec))
    return out


def spec_fingerprint(spec: TinySpec) -> str:
    """Changes whenever the spec or the builder's output format changes."""
    payload = json.dumps({"builder": BUILDER_VERSION, "spec": dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tiny_model_dir(name: str = DEFAULT_TINY_MODEL) -> pathlib.Path:
    """Cached fp32 checkpoint `name` under $JAXPAGED_CACHE (default ~/.cache/jaxpaged)/tiny/<name>,
    built on first use and rebuilt when its stamp does not match (see cache_dir.cached_build)."""
    spec = resolve_spec(name)
    return cached_build(cache_root() / "tiny" / spec.name, spec_fingerprint(spec),
                        "jaxpaged_tiny_stamp.txt", lambda out: build_tiny_checkpoint(spec, out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny Hugging Face LLaMA checkpoint.")
    parser.add_argument("out_dir")
    parser.add_argument("--name", default=DEFAULT_TINY_MODEL, choices=sorted(TINY_SPECS))
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args(argv)
    print(build_tiny_checkpoint(args.name, args.out_dir, dtype=args.dtype, shards=args.shards))


if __name__ == "__main__":
    main()
