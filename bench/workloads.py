"""The request sets of BENCHMARKS.md, generated exactly as its protocols say."""

from __future__ import annotations

import random
from dataclasses import dataclass


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


@dataclass(frozen=True)
class BenchRequests:
    """A throughput run's requests, for any engine: token-id prompts, each request's output length
    (EOS ignored) and the one sampling temperature of the workload."""

    prompts: list[list[int]]
    output_lens: list[int]
    temperature: float


def throughput_requests(workload: str, num_requests: int | None = None) -> BenchRequests:
    """bench/throughput.py's requests (and its baselines'): nano (temperature 0.6; --num-requests
    takes the first N, as hf_baseline.py does) or fixed (greedy; N requests, default 128)."""
    if workload == "nano":
        prompts, outputs = nano_workload()
        return BenchRequests(prompts[:num_requests], outputs[:num_requests], 0.6)
    if workload == "fixed":
        prompts, outputs = fixed_workload(num_requests or 128)
        return BenchRequests(prompts, outputs, 0.0)
    raise ValueError(f"unknown workload {workload!r} (nano, fixed)")


def add_throughput_run_args(parser) -> None:
    """The workload and engine-size flags that our throughput run and vLLM's baseline share (one
    place, so that both engines run the same requests under the same limits)."""
    parser.add_argument("--workload", choices=["nano", "fixed"], default="nano")
    parser.add_argument("--num-requests", type=int)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)


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
