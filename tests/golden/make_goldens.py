"""Golden references from Hugging Face transformers (torch, CPU, fp32) for every tiny checkpoint.

Run with the torch venv (not the project's .venv, which has no torch):

    /tmp/torch311/bin/python tests/golden/make_goldens.py

For each `converters.tiny.TINY_SPECS` entry it builds the fp32 checkpoint in a temporary directory,
loads it with `AutoModelForCausalLM.from_pretrained(..., dtype=float32, attn_implementation="eager")` and writes
`tests/golden/<name>.npz` (no pickled objects) with, for prompt i in 0..2:
    prompt_text_{i}          str (0-d unicode array)
    prompt_ids_{i}           int32 [T]        tokenizer.json ids, BOS included
    prompt_logits_{i}        float32 [T, V]   logits at every prompt position (one forward pass)
    greedy_ids_{i}           int32 [32]       model.generate(do_sample=False), EOS not allowed to stop it
    greedy_margins_{i}       float32 [32]     top-1 minus top-2 raw logit at each greedy step
    greedy_logit_scale_{i}   float32 [32]     std of the raw logits at each greedy step
plus `model_sha256` (of model.safetensors, to detect a changed builder) and `versions` (json).

It refuses to write goldens whose greedy steps are fragile (margin < MIN_RELATIVE_MARGIN * scale) or
whose generated tokens differ from the raw argmax (an EOS masked by min_new_tokens): change the
spec's seed in converters/tiny.py instead.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
import tempfile

import numpy as np
import safetensors
import tokenizers
import torch
import transformers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from converters import tiny  # noqa: E402  (converters/__init__.py imports nothing)

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent
NUM_NEW_TOKENS = 32
MIN_RELATIVE_MARGIN = 1e-3
PROMPTS = (  # 7, 20 and 38 tokens with BOS: the last one spans three KV blocks of 16
    "The cat sat.",
    "héllo ☃ 日本, the answer",
    "Each block holds sixteen tokens. When a request finishes, its blocks go back to the pool.",
)


def load_model(model_dir: pathlib.Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {key: value for key, value in info.items() if value}  # missing, unexpected, mismatched, errors
    if bad:
        raise RuntimeError(f"{model_dir.name}: weights did not load cleanly: {bad}")
    return model.eval()


def greedy_generate(model, prompt_ids: list[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (generated ids [N], raw logits before logits processors [N, V])."""
    input_ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
        max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=NUM_NEW_TOKENS, pad_token_id=pad_id,
        return_dict_in_generate=True, output_logits=True)
    generated = out.sequences[0, len(prompt_ids):].numpy().astype(np.int32)  # [N]
    raw_logits = torch.stack(out.logits)[:, 0].float().numpy()  # [N, V]
    return generated, raw_logits


def check_greedy(name: str, i: int, generated: np.ndarray, raw: np.ndarray, tokenizer_size: int) -> np.ndarray:
    """Validates the greedy run and returns the top-2 margins [N]."""
    if len(generated) != NUM_NEW_TOKENS:
        raise RuntimeError(f"{name} prompt {i}: generated {len(generated)} tokens")
    if not np.array_equal(generated, raw.argmax(-1)):
        raise RuntimeError(f"{name} prompt {i}: generate() differs from the raw argmax (EOS masked?)")
    if generated.max() >= tokenizer_size:
        raise RuntimeError(f"{name} prompt {i}: generated a padding id {generated.max()}")
    top2 = np.sort(raw, axis=-1)[:, -2:]  # [N, 2]
    margins = top2[:, 1] - top2[:, 0]
    scale = raw.std(-1)
    if np.any(margins < MIN_RELATIVE_MARGIN * scale):
        raise RuntimeError(f"{name} prompt {i}: fragile greedy step, margins/scale min "
                           f"{(margins / scale).min():.2e}; change the spec's seed")
    return margins


def goldens_for_spec(spec: tiny.TinySpec, workdir: pathlib.Path) -> dict[str, np.ndarray]:
    model_dir = tiny.build_tiny_checkpoint(spec, workdir / spec.name)
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    config = json.loads((model_dir / "config.json").read_text())
    model = load_model(model_dir)
    arrays: dict[str, np.ndarray] = {
        "model_sha256": np.array(hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()),
        "versions": np.array(json.dumps({
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__})),
    }
    for i, text in enumerate(PROMPTS):
        ids = tok.encode(text).ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()  # [T, V]
        generated, raw = greedy_generate(model, ids, pad_id=config["eos_token_id"])
        margins = check_greedy(spec.name, i, generated, raw, tok.get_vocab_size())
        arrays.update({
            f"prompt_text_{i}": np.array(text),
            f"prompt_ids_{i}": np.asarray(ids, np.int32),
            f"prompt_logits_{i}": logits.astype(np.float32),
            f"greedy_ids_{i}": generated,
            f"greedy_margins_{i}": margins.astype(np.float32),
            f"greedy_logit_scale_{i}": raw.std(-1).astype(np.float32),
        })
        print(f"{spec.name} prompt {i}: T={len(ids)} min margin/scale "
              f"{(margins / raw.std(-1)).min():.3f} greedy {generated[:8].tolist()}...")
    return arrays


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in tiny.TINY_SPECS.values():
            arrays = goldens_for_spec(spec, pathlib.Path(tmp))
            np.savez_compressed(GOLDEN_DIR / f"{spec.name}.npz", **arrays)
    total = sum(p.stat().st_size for p in GOLDEN_DIR.glob("*.npz"))
    print(f"wrote {len(tiny.TINY_SPECS)} files, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
