"""The request sets of BENCHMARKS.md, generated exactly as its protocols say."""

from __future__ import annotations

import random


def nano_workload(num_requests: int = 256, max_input_len: int = 1024,
                  max_output_len: int = 1024) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench.py: seed 0; first all prompts, then all output lengths."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, max_input_len))]
               for _ in range(num_requests)]
    output_lens = [random.randint(100, max_output_len) for _ in range(num_requests)]
    return prompts, output_lens


def fixed_workload(num_requests: int = 128, prompt_len: int = 512,
                   output_len: int = 256) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(prompt_len)] for _ in range(num_requests)]
    return prompts, [output_len] * num_requests


def beam_workload(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0):
    """Random-token prompts of bench/beam_search.py and its HF baseline (same seed, same ids)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size - 100) for _ in range(prompt_len)]
            for _ in range(num_prompts)]


def add_beam_workload_args(parser) -> None:
    """The beam-search workload's flags, shared by bench/beam_search.py and its HF baseline."""
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--beam-widths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
