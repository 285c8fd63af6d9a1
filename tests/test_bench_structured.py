"""The structured-outputs benchmark's helpers (bench/): the synthetic tokenizer that gives the
host's mask work a real model's vocabulary, and the GPU busy time read from a profiler trace."""

import json
import pathlib
import sys

import llguidance
import llguidance.hf
import pytest
from transformers import AutoTokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gpu_trace import busy_time  # noqa: E402
from synthetic_tokenizer import NUM_SPECIAL, write_synthetic_tokenizer  # noqa: E402

VOCAB = 4096


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(
        str(write_synthetic_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB)))


def test_synthetic_tokenizer_has_the_size_and_special_ids_asked(tokenizer):
    base = VOCAB - NUM_SPECIAL  # Llama 3's layout: 128000 for 128256
    assert len(tokenizer) == VOCAB
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (base, base + 1)
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == base + 9
    text = '{"title": "Rain in Paris",\n  "count": [1, 22]}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and len(ids) < len(text)  # merges in use
    assert max(ids) < base


def test_synthetic_tokenizer_drives_a_json_grammar(tokenizer):
    ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB,
                                      eos_token=[VOCAB - NUM_SPECIAL + 1])
    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    assert matcher.consume_tokens(tokenizer.encode('{"a": [1, "b"]}', add_special_tokens=False))
    assert matcher.is_accepting()


def test_synthetic_tokenizer_is_the_same_every_time(tmp_path):
    first = write_synthetic_tokenizer(tmp_path / "a", 1024) / "tokenizer.json"
    second = write_synthetic_tokenizer(tmp_path / "b", 1024) / "tokenizer.json"
    assert json.loads(first.read_text()) == json.loads(second.read_text())
    with pytest.raises(ValueError, match="vocab_size"):
        write_synthetic_tokenizer(tmp_path / "c", 300)


def test_busy_time_counts_overlapping_kernels_once():
    assert busy_time([]) == 0
    assert busy_time([(0, 10), (20, 25)]) == 15
    assert busy_time([(5, 10), (0, 8), (9, 12), (20, 21)]) == 13  # [0, 12] and [20, 21]
    assert busy_time([(0, 10), (2, 3)]) == 10
