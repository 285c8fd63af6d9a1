"""Helpers shared by the engine tests: the tiny model's goldens, engines, prompts, compile counts."""

from __future__ import annotations

import random

import jax
import numpy as np

from conftest import GOLDEN_DIR
from jaxpaged import LLM, SamplingParams

MODEL = "llama3-rope"
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def golden_prompts(model: str = MODEL) -> tuple[list[dict], list[list[int]]]:
    """The HF golden prompts as token prompts, and HF's 32 greedy tokens for each."""
    data = np.load(GOLDEN_DIR / f"{model}.npz")
    count = sum(1 for k in data.files if k.startswith("prompt_ids_"))
    return ([{"prompt_token_ids": data[f"prompt_ids_{i}"].tolist()} for i in range(count)],
            [data[f"greedy_ids_{i}"].tolist() for i in range(count)])


def make_llm(tiny_checkpoint, **overrides) -> LLM:
    """The engine settings every engine test shares, so a suite run reuses their compilations."""
    args = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
                seed=0, compile_step_shapes="start")
    return LLM(str(tiny_checkpoint(MODEL)), **{**args, **overrides})


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def random_prompts(count: int, seed: int, low: int = 3, high: int = 70) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(5, 430) for _ in range(rng.randint(low, high))]}
            for _ in range(count)]


def compilations_during(run) -> list[str]:
    """The lowering/compile events JAX reports while ``run()`` executes."""
    events: list[str] = []
    recording = True

    def listen(event, duration, **kwargs):
        if recording and event in COMPILE_EVENTS:
            events.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        run()
    finally:
        recording = False  # listeners cannot be removed; this one goes quiet
    return events


def run_varied_workload(llm: LLM) -> None:
    """Prompts of 1-100 tokens, greedy, random and seeded sampling, 1-26 output tokens."""
    workload = random_prompts(9, seed=4, low=1, high=100)
    params = [SamplingParams(temperature=t, max_tokens=m, ignore_eos=True, seed=s)
              for t, m, s in zip([0.0, 0.7, 1.0] * 3, [1, 5, 17, 2, 9, 3, 26, 4, 6],
                                 [None, 1, None] * 3)]
    llm.generate(workload, params, use_tqdm=False)
    llm.generate(workload[:2], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
