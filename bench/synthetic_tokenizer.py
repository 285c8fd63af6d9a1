"""A synthetic byte-level BPE tokenizer of a real model's size, for benchmarks whose host cost
grows with the vocabulary (the structured-outputs bitmask: llguidance walks every token's bytes)
on machines that cannot fetch a real tokenizer.

    write_synthetic_tokenizer(out_dir, vocab_size=128256)  # Llama 3's size and special ids

The vocabulary is ``vocab_size - 256`` regular tokens (the 256 byte tokens, then merges that grow
word pieces: letters with and without a leading space, digits, punctuation runs such as ``",``
and ``":``, newlines and indentation) followed by 256 special tokens, laid out as Llama 3's:
``<|begin_of_text|>`` at ``vocab_size - 256``, ``<|end_of_text|>`` right after it, ``<|eom_id|>``
and ``<|eot_id|>`` at +8 and +9, reserved tokens elsewhere. Seeded: the same files every time.
"""

from __future__ import annotations

import json
import pathlib
import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

NUM_SPECIAL = 256
SPECIAL_NAMES = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 8: "<|eom_id|>", 9: "<|eot_id|>"}
MAX_TOKEN_CHARS = 16
# pieces merges start from (ByteLevel spells " " as "Ġ" and "\n" as "Ċ")
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_SEEDS = (list(_LETTERS) + [c.upper() for c in _LETTERS] + list("0123456789")
          + ["Ġ" + c for c in _LETTERS] + ["Ġ" + c.upper() for c in _LETTERS]
          + list('",:{}[]._-/()!?;\'') + ["Ċ", "ĠĠ", "ĊĠ", "ĠĠĠĠ"])


def byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def synthetic_merges(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` BPE merges over the byte alphabet: first the seed pieces, then random extensions of existing pieces by a letter or another piece."""
    rng = random.Random(seed)
    alphabet = set(byte_alphabet())
    known, merges, pool = set(alphabet), [], []

    def add(a: str, b: str) -> None:
        if a + b not in known and len(merges) < count:
            known.add(a + b)
            merges.append((a, b))
            pool.append(a + b)
    for piece in _SEEDS:
        for size in range(2, len(piece) + 1):  # every prefix, so each merge's parts exist
            add(piece[:size - 1], piece[size - 1])
    pool.extend(p for p in _SEEDS if len(p) == 1)
    while len(merges) < count:
        a = pool[rng.randrange(len(pool))]
        b = rng.choice(_LETTERS) if rng.random() < 0.7 else pool[rng.randrange(len(pool))]
        if len(a) + len(b) <= MAX_TOKEN_CHARS and not b.startswith("Ġ"):
            add(a, b)
    return merges


def build_synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    regular = vocab_size - NUM_SPECIAL
    alphabet = byte_alphabet()
    if regular <= len(alphabet):
        raise ValueError(f"vocab_size must exceed {len(alphabet) + NUM_SPECIAL}, got {vocab_size}")
    merges = synthetic_merges(regular - len(alphabet), seed)
    vocab = {token: i for i, token in enumerate(alphabet + [a + b for a, b in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([
        AddedToken(SPECIAL_NAMES.get(i, f"<|reserved_special_token_{i}|>"), special=True,
                   normalized=False) for i in range(NUM_SPECIAL)])
    return tokenizer


def write_synthetic_tokenizer(out_dir: pathlib.Path, vocab_size: int = 128256,
                              seed: int = 0) -> pathlib.Path:
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build_synthetic_tokenizer(vocab_size, seed).save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_NAMES[0],
              "eos_token": SPECIAL_NAMES[1], "model_max_length": 131072}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
