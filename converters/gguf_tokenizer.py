"""A GGUF file's tokenizer as Hugging Face ``tokenizer.json`` + ``tokenizer_config.json``.

Built with the ``tokenizers`` library from the ``tokenizer.ggml.*`` metadata: a byte-level BPE
(``model="gpt2"``: the vocabulary strings and merges are GPT-2's byte-level ones) with the
special tokens, the BOS/EOS ids and the pre-tokenizer that ``tokenizer.ggml.pre`` names in
llama.cpp, plus the chat template (``tokenizer.chat_template``). Another tokenizer model or
pre-tokenizer is a ValueError that names it.
"""

from __future__ import annotations

from typing import Any

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxpaged.converters.gguf_reader import GGUFFile

_GPT2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
# llama.cpp's pre-tokenizer names -> the same splitting in `tokenizers`. "smollm" (also
# "starcoder") first splits every digit on its own, then applies the GPT-2 regex.
PRE_TOKENIZERS = {
    "default": _GPT2,
    "gpt-2": _GPT2,
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2]),
    "starcoder": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2]),
}
_SPECIAL_TYPES = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)


def build_tokenizer(f: GGUFFile) -> Tokenizer:
    """The fast tokenizer described by ``f``'s metadata."""
    model = f.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{f.path.name}: tokenizer.ggml.model={model!r} is not supported (only "
                         "'gpt2', byte-level BPE); pass --tokenizer with a Hugging Face tokenizer")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{f.path.name}: tokenizer.ggml.pre={pre!r} is not supported (jaxpaged "
                         f"knows {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens: list[str] = list(f.require("tokenizer.ggml.tokens"))
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_merges(f), fuse_unk=False))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]
    tokenizer.decoder = decoders.ByteLevel()
    _add_vocabulary_tokens(tokenizer, f, tokens)
    tokenizer.post_processor = _post_processor(f, tokens)
    return tokenizer


def tokenizer_config(f: GGUFFile) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens by name, the context length, the chat template."""
    tokens = f.require("tokenizer.ggml.tokens")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "clean_up_tokenization_spaces": False,
                              "model_input_names": ["input_ids", "attention_mask"],
                              "model_max_length": f.get("{arch}.context_length")}
    for name in ("bos", "eos", "unknown", "padding"):
        token_id = f.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            key = {"unknown": "unk_token", "padding": "pad_token"}.get(name, f"{name}_token")
            config[key] = tokens[token_id]
    template = f.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return config


def _merges(f: GGUFFile) -> list[tuple[str, str]]:
    merges = []
    for merge in f.require("tokenizer.ggml.merges"):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{f.path.name}: malformed BPE merge {merge!r} in "
                             "tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))
    return merges


def _add_vocabulary_tokens(tokenizer: Tokenizer, f: GGUFFile, tokens: list[str]) -> None:
    """Control tokens as special tokens, user-defined ones as plain added tokens: both are matched
    whole in the input before the pre-tokenizer runs, as in Hugging Face's own tokenizer.json."""
    types = f.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    special = [t for t, kind in zip(tokens, types) if kind in _SPECIAL_TYPES]
    user = [t for t, kind in zip(tokens, types) if kind == gguf.TokenType.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _post_processor(f: GGUFFile, tokens: list[str]) -> processors.PostProcessor:
    """Byte-level offsets, plus BOS / EOS around the text where the GGUF asks for them
    (llama.cpp's default for byte-level BPE: neither)."""
    parts, specials = ["$A"], {}
    for name in ("bos", "eos"):
        token_id = f.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is None or not f.get(f"tokenizer.ggml.add_{name}_token", False):
            continue
        parts = [tokens[token_id], *parts] if name == "bos" else [*parts, tokens[token_id]]
        specials[tokens[token_id]] = token_id
    steps = [processors.ByteLevel(trim_offsets=False)]
    if specials:
        single = " ".join(parts)
        pair = single + " " + " ".join(f"{p.replace('$A', '$B')}:1" for p in parts)
        steps.append(processors.TemplateProcessing(single=single, pair=pair,
                                                   special_tokens=list(specials.items())))
    return processors.Sequence(steps)
