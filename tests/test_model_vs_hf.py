"""The Flax LLaMA against Hugging Face transformers (goldens made by tests/golden/make_goldens.py).

fp32 logits at every prompt position must match HF's to 1e-4 relative, and 32 greedy tokens
generated through the paged KV cache (prefill, then one-token decode steps) must equal HF's.
"""

import numpy as np
import pytest

from conftest import GOLDEN_DIR, TINY_NAMES
from jaxpaged.models.loader import load_model
from model_testing import generate

LOGITS_RTOL = 1e-4


def goldens(name):
    data = np.load(GOLDEN_DIR / f"{name}.npz")
    count = sum(1 for key in data.files if key.startswith("prompt_ids_"))
    return [(data[f"prompt_ids_{i}"].tolist(), data[f"prompt_logits_{i}"], data[f"greedy_ids_{i}"])
            for i in range(count)]


def relative_error(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_fp32_logits_and_greedy_tokens_match_hf(name, tiny_checkpoint):
    model = load_model(tiny_checkpoint(name), dtype="fp32", attn_impl="reference")
    for prompt_ids, hf_logits, hf_greedy in goldens(name):
        result = generate(model, prompt_ids, max_new_tokens=len(hf_greedy))
        assert result.prompt_logits.shape == hf_logits.shape
        assert relative_error(result.prompt_logits, hf_logits) < LOGITS_RTOL
        np.testing.assert_allclose(result.prompt_logits, hf_logits, rtol=0,
                                   atol=LOGITS_RTOL * np.abs(hf_logits).max())
        assert result.token_ids == hf_greedy.tolist()


def test_bf16_model_stays_close_to_hf(tiny_checkpoint):
    model = load_model(tiny_checkpoint("llama3-rope"), dtype="bf16", attn_impl="reference")
    prompt_ids, hf_logits, _ = goldens("llama3-rope")[1]
    result = generate(model, prompt_ids, max_new_tokens=1)
    assert relative_error(result.prompt_logits, hf_logits) < 3e-2


def test_goldens_cover_every_tiny_config():
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.npz")
                   if p.stem not in ("smollm2", "beam_search")) == TINY_NAMES
