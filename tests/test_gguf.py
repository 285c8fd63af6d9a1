"""GGUF input on small synthetic files written with gguf's GGUFWriter (tests/gguf_testing.py).

References: each quant type against its float source (within the type's rounding step) and
against gguf's own dequantization of the same bytes; a tiny HF checkpoint written as llama.cpp
writes it (names, permuted q/k rows) against Hugging Face's goldens for that checkpoint; the
tokenizer rebuilt from the metadata against the checkpoint's tokenizer.json. Plus the refusals.
"""

import json

import gguf
import numpy as np
import pytest

from conftest import GOLDEN_DIR
from gguf_testing import Q, llama_cpp_permute, write_llama_gguf, write_tensors_gguf
from jaxpaged import LLM, SamplingParams
from jaxpaged.cli import main as cli_main
from jaxpaged.models.config import ModelConfig
from jaxpaged.converters.gguf_config import hf_config
from jaxpaged.converters.gguf_model import gguf_params, resolve_model_path
from jaxpaged.converters.gguf_reader import GGUFFile
from jaxpaged.converters.gguf_tensors import unpermute_rope_rows
from jaxpaged.converters.hf_to_params import params_from_hf
from jaxpaged.models.loader import load_model
from jaxpaged.engine.tokenizer import load_tokenizer
from model_testing import generate

ROWS, COLS = 8, 512  # 512: two K-quant super-blocks of 256 per row
# The types gguf can quantize, with the rounding step of a 32-value block as a function of
# that block's values (one step bounds the error: rounding is to the nearest level).
STEPS = {
    Q.F32: lambda b: np.zeros(len(b)),
    Q.F16: lambda b: np.abs(b).max(-1) * 2.0**-10,
    Q.BF16: lambda b: np.abs(b).max(-1) * 2.0**-7,
    Q.Q8_0: lambda b: np.abs(b).max(-1) / 127,
    Q.Q4_0: lambda b: np.abs(b).max(-1) / 8,
    Q.Q5_0: lambda b: np.abs(b).max(-1) / 16,
    Q.Q4_1: lambda b: np.ptp(b, -1) / 15,
    Q.Q5_1: lambda b: np.ptp(b, -1) / 31,
}
K_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf dequantizes these, cannot quantize


@pytest.fixture(autouse=True)
def _side_files_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("qtype", list(STEPS), ids=lambda q: q.name)
def test_quantized_tensor_reads_back_within_its_step(qtype, tmp_path):
    source = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
    f = GGUFFile(write_tensors_gguf(tmp_path / "t.gguf", {"w": (source, qtype)}))
    assert f.tensor_type("w") == qtype and f.tensor_shape("w") == (ROWS, COLS)
    ours = f.dequantize("w")
    expected = gguf.quants.dequantize(gguf.quants.quantize(source, qtype), qtype)
    np.testing.assert_array_equal(ours, expected.reshape(ROWS, COLS))
    blocks_err = np.abs(ours - source).reshape(-1, 32).max(-1)
    assert np.all(blocks_err <= STEPS[qtype](source.reshape(-1, 32)) * 1.01 + 1e-7)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_k_quant_tensor_reads_as_gguf_dequantizes_it(qtype, tmp_path):
    byte_shape = gguf.quants.quant_shape_to_byte_shape((ROWS, COLS), qtype)
    # bytes below 0x78 keep every fp16 scale in a block finite
    raw = np.random.default_rng(1).integers(0, 0x78, byte_shape, dtype=np.uint8)
    f = GGUFFile(write_tensors_gguf(tmp_path / "t.gguf", {"w": (raw, qtype)}))
    assert f.tensor_shape("w") == (ROWS, COLS)
    ours = f.dequantize("w")
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype).reshape(ROWS, COLS))
    assert np.isfinite(ours).all() and np.ptp(ours) > 0


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(2).standard_normal((3 * 16, 5)).astype(np.float32)
    for heads, kv_heads in ((3, 3), (6, 3)):
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads, kv_heads), 3), w)
    with pytest.raises(ValueError, match="heads"):
        unpermute_rope_rows(w[:-1], 3)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied"])
def test_f32_gguf_loads_the_hf_model_exactly(name, tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint(name)
    model_dir = resolve_model_path(write_llama_gguf(hf_dir, tmp_path / f"{name}.gguf"))
    assert ModelConfig.from_dir(model_dir) == ModelConfig.from_dir(hf_dir)
    model = load_model(model_dir, dtype="fp32", attn_impl="reference")
    with np.load(GOLDEN_DIR / f"{name}.npz") as golden:
        ids, hf_logits = golden["prompt_ids_2"].tolist(), golden["prompt_logits_2"]
        result = generate(model, ids, max_new_tokens=len(golden["greedy_ids_2"]))
        assert result.token_ids == golden["greedy_ids_2"].tolist()
    np.testing.assert_allclose(result.prompt_logits, hf_logits, rtol=0,
                               atol=1e-4 * np.abs(hf_logits).max())


def test_tokenizer_and_chat_template_rebuilt_from_metadata(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("llama-gqa")
    ours = load_tokenizer(resolve_model_path(write_llama_gguf(hf_dir, tmp_path / "m.gguf")))
    theirs = load_tokenizer(hf_dir)
    text = "héllo ☃ 日本, the answer is 42.<|eot_id|> Questions and answers"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.encode(text)[0] == theirs.bos_token_id
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == \
        theirs.decode(theirs.encode(text), skip_special_tokens=True)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token)


def test_q8_0_gguf_weights_stay_within_the_type_step(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("llama-gqa")
    ours = gguf_params(write_llama_gguf(hf_dir, tmp_path / "m.gguf", qtype=Q.Q8_0), "fp32")
    reference = params_from_hf(hf_dir, ModelConfig.from_dir(hf_dir), "fp32")
    flat_ours, flat_ref = _flatten(ours), _flatten(reference)
    assert flat_ours.keys() == flat_ref.keys()
    for key, ref in flat_ref.items():
        # q/k rows restored: without that, whole rows would differ by far more than one step
        assert np.abs(flat_ours[key] - ref).max() <= np.abs(ref).max() / 127 + 1e-7, key


def test_llm_and_convert_take_a_gguf_file(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("llama-gqa")
    path = write_llama_gguf(hf_dir, tmp_path / "m.gguf")
    args = dict(dtype="float32", max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32)
    with np.load(GOLDEN_DIR / "llama-gqa.npz") as golden:
        ids, expected = golden["prompt_ids_0"].tolist(), golden["greedy_ids_0"].tolist()[:8]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = {"prompt_token_ids": ids}
    assert LLM(str(path), **args).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == expected
    out = tmp_path / "converted"
    assert cli_main(["convert", str(path), str(out), "--dtype", "fp32"]) == 0
    assert json.loads((out / "config.json").read_text()) == hf_config(GGUFFile(path))
    assert LLM(str(out), **args).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_linear_rope_scaling_is_mapped(tiny_checkpoint, tmp_path):
    def edit(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)
    path = write_llama_gguf(tiny_checkpoint("llama-gqa"), tmp_path / "m.gguf", edit=edit)
    assert hf_config(GGUFFile(path))["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize(("edit", "match"), [
    (lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                w.add_rope_scaling_factor(4.0)), "rope.scaling.type='yarn'"),
    (lambda w: w.add_expert_count(8), "mixture-of-experts"),
    (lambda w: w.add_tensor("rope_freqs.weight", np.ones(8, np.float32)), "rope_freqs"),
], ids=["yarn", "moe", "rope-freqs"])
def test_unsupported_model_features_are_refused_by_name(edit, match, tiny_checkpoint, tmp_path):
    path = write_llama_gguf(tiny_checkpoint("llama-gqa"), tmp_path / "m.gguf", edit=edit)
    with pytest.raises(ValueError, match=match):
        hf_config(GGUFFile(path))


def test_unknown_architecture_is_refused_by_name(tmp_path):
    path = write_tensors_gguf(tmp_path / "m.gguf", {"token_embd.weight": (np.ones((4, 32), np.float32), Q.F32)},
                              arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        LLM(str(path))


def test_unknown_quant_type_is_refused_by_name(tmp_path):
    raw = np.zeros(gguf.quants.quant_shape_to_byte_shape((4, 256), Q.IQ4_NL), np.uint8)
    path = write_tensors_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' has GGUF type IQ4_NL"):
        GGUFFile(path)


def test_unknown_tensor_and_tokenizer_are_refused_by_name(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("llama-gqa")
    extra = write_llama_gguf(hf_dir, tmp_path / "extra.gguf",
                             edit=lambda w: w.add_tensor("blk.0.attn_q.bias", np.ones(128, np.float32)))
    with pytest.raises(ValueError, match="unknown GGUF tensor 'blk.0.attn_q.bias'"):
        gguf_params(extra, "fp32")
    spm = write_llama_gguf(hf_dir, tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
        resolve_model_path(spm)
    not_gguf = tmp_path / "bad.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        GGUFFile(not_gguf)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}/{key}").items()}
    return {prefix: np.asarray(tree)}
