"""KV waste on the nano workload's length distribution, scaled down 4x for the CPU."""

import random

from jaxpaged import LLM, SamplingParams


def test_kv_waste_on_scaled_nano_is_at_most_4_percent(tiny_checkpoint):
    rng = random.Random(0)
    count = 40
    prompts = [{"prompt_token_ids": [rng.randint(5, 430) for _ in range(rng.randint(25, 256))]}
               for _ in range(count)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(25, 256))
              for _ in range(count)]
    llm = LLM(str(tiny_checkpoint("llama3-rope")), dtype="float32", max_model_len=512,
              max_num_seqs=16, max_num_batched_tokens=512)
    engine = llm.llm_engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), None, p, prompt_token_ids=prompt["prompt_token_ids"])
    wastes = []
    while engine.has_unfinished_requests():
        engine.step()
        allocated, used = engine.kv_slot_usage()
        if allocated:
            wastes.append(1 - used / allocated)
    mean_waste = sum(wastes) / len(wastes)
    assert len(wastes) > 100
    assert 0 < mean_waste <= 0.04, mean_waste
