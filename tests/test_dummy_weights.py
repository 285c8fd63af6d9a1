"""load_format="dummy": random weights from config.json alone, made on the device."""

import shutil

import numpy as np
from flax import nnx

from jaxpaged import LLM, SamplingParams
from jaxpaged.models.loader import load_model


def test_dummy_weights_have_the_model_shapes_and_scale(tiny_checkpoint):
    real = nnx.to_pure_dict(nnx.state(load_model(tiny_checkpoint("llama-gqa"), dtype="fp32")))
    dummy = nnx.to_pure_dict(nnx.state(load_model(tiny_checkpoint("llama-gqa"), dtype="bf16",
                                                  load_format="dummy", seed=3)))
    flat_real = {k: v for k, v in _flatten(real)}
    flat_dummy = {k: v for k, v in _flatten(dummy)}
    assert flat_real.keys() == flat_dummy.keys()
    for name, value in flat_dummy.items():
        assert value.shape == flat_real[name].shape and value.dtype == np.dtype("bfloat16")
        values = np.asarray(value, np.float32)
        if "norm" in name:
            assert np.all(values == 1.0)
        else:
            assert 0.015 < values.std() < 0.025, name
    wqkv = [flat_dummy[k] for k in flat_dummy if k.endswith("wqkv")]
    assert not np.array_equal(np.asarray(wqkv[0]), np.asarray(wqkv[1])), "layers differ"


def test_a_directory_with_only_config_json_serves_token_prompts(tiny_checkpoint, tmp_path):
    shutil.copy(tiny_checkpoint("llama-mha") / "config.json", tmp_path / "config.json")
    llm = LLM(str(tmp_path), load_format="dummy", max_model_len=64, max_num_seqs=2,
              max_num_batched_tokens=32)
    assert llm.get_tokenizer() is None
    out = llm.generate({"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text == ""


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
