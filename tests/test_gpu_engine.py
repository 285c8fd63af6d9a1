"""The engine on the GPU with the Pallas kernels (run with `-m gpu` on the GPU machine)."""

import numpy as np
import pytest

from jaxpaged import LLM, SamplingParams
from llm_testing import MODEL, golden_prompts

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    args = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
                kv_cache_memory_bytes=64 * 2**20)
    path = str(tiny_checkpoint(MODEL))
    return {impl: LLM(path, attention_impl=impl, **args) for impl in ("pallas", "reference")}


def test_pallas_engine_matches_hf_greedy_tokens(engines):
    prompts, expected = golden_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in engines["pallas"].generate(prompts, params,
                                                                     use_tqdm=False)]
    assert got == expected


def test_pallas_and_reference_engines_agree(engines):
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(5, 430, rng.integers(2, 90)).tolist()}
               for _ in range(10)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)
    outs = {impl: llm.generate(prompts, params, use_tqdm=False) for impl, llm in engines.items()}
    for a, b in zip(outs["pallas"], outs["reference"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        np.testing.assert_allclose(
            [e[t].logprob for t, e in zip(a.outputs[0].token_ids, a.outputs[0].logprobs)],
            [e[t].logprob for t, e in zip(b.outputs[0].token_ids, b.outputs[0].logprobs)],
            atol=2e-2)


def test_second_engine_loads_compiled_steps_and_matches(engines, tiny_checkpoint):
    """The first engines stored their step programs beside the compilation cache; a new engine
    loads every one of them (no compile) and generates the same tokens."""
    path = str(tiny_checkpoint(MODEL))
    again = LLM(path, attention_impl="pallas", dtype="float32", max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=32, kv_cache_memory_bytes=64 * 2**20)
    stats = again.llm_engine.runner._executable_cache.stats
    assert stats.hits >= len(again.llm_engine.runner.ladder.all_shapes())
    assert stats.misses == 0 and stats.load_failures == 0
    prompts, expected = golden_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in again.generate(prompts, params, use_tqdm=False)]
    assert got == expected
