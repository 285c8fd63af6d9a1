"""Hugging Face transformers baselines on the same GPU (BENCHMARKS.md "Baselines").

``--method static`` (default): ``model.generate`` with static batching (vLLM's ``--backend hf``
protocol): requests in groups of up to 64, left-padded; every sequence of a group generates the
group's longest output length (``min_new_tokens`` = ``max_new_tokens``, EOS disabled), and
throughput counts the requested output tokens, as nano does.

``--method generate_batch``: continuous batching, through the manager that ``model.generate_batch``
wraps (``init_continuous_batching`` with the same workload hints, warm-up and config), so that each
request gets its own ``max_new_tokens`` (``generate_batch`` takes one for all). EOS is disabled, so
every request produces exactly its workload length; the run checks that and reports any request
whose length differs. Attention is ``--attn-implementation`` (default ``paged|sdpa``).

``--time-limit S`` bounds the timed run: static batching starts no group after S seconds;
continuous batching hard-stops at S seconds, and tokens that requests generated before the stop
count (``timed_out``, ``completed_requests`` and ``partial_tokens`` say how much finished).

Random bf16 weights of the config's shapes are initialized on the device.

    python bench/hf_baseline.py --model bench/configs/llama3-8b --workload nano --num-requests 64
    python bench/hf_baseline.py --workload nano --first-request 128  # the second half of nano
    python bench/hf_baseline.py --method generate_batch --workload nano --time-limit 300
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

# bench/kernels.py must not shadow the `kernels` package that transformers probes for (a script's
# own folder is first on sys.path): keep bench/ off the path except to import the two helpers.
BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR))
from workloads import fixed_workload, nano_workload  # noqa: E402
from report import emit  # noqa: E402
sys.path.remove(str(BENCH_DIR))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM, ContinuousBatchingConfig,  # noqa: E402
                          GenerationConfig)
from transformers.generation.continuous_batching.utils import WorkloadHints  # noqa: E402

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class RunStats:
    """One timed run. ``output_tokens`` counts requested tokens actually generated, at most each
    request's workload length; ``partial_tokens`` is the part of it from unfinished requests."""
    seconds: float
    completed_requests: int
    output_tokens: int
    partial_tokens: int = 0
    wrong_length_requests: int = 0
    timed_out: bool = False


def load_random_model(model_dir: str, device: str):
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def generation_config(temperature: float, max_new_tokens: int, force_length: bool) -> GenerationConfig:
    """EOS disabled; greedy when ``temperature`` is 0, else plain temperature sampling (no top-k/p)."""
    return GenerationConfig(max_new_tokens=max_new_tokens,
                            min_new_tokens=max_new_tokens if force_length else None,
                            eos_token_id=None, pad_token_id=PAD_ID, do_sample=temperature > 0,
                            temperature=temperature or None, top_k=None, top_p=None)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_static(model, prompts: list[list[int]], outputs: list[int], group: int,
               temperature: float, device: str, time_limit: float | None = None) -> RunStats:
    """Groups of ``group`` requests in order; no group starts after ``time_limit`` seconds."""
    start = time.perf_counter()
    done = tokens = wrong = 0
    for first in range(0, len(prompts), group):
        if time_limit is not None and time.perf_counter() - start >= time_limit:
            break
        batch, lens = prompts[first:first + group], outputs[first:first + group]
        width = max(map(len, batch))
        ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        config = generation_config(temperature, max(lens), force_length=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        done, tokens = done + len(batch), tokens + sum(lens)
        wrong += len(batch) * (out.shape[1] - width != max(lens))  # out: [len(batch), width + n]
    synchronize(device)
    return RunStats(time.perf_counter() - start, done, tokens, wrong_length_requests=wrong,
                    timed_out=done < len(prompts))


def start_manager(model, prompts: list[list[int]], outputs: list[int], temperature: float,
                  cuda_graphs: bool | None):
    """The continuous-batching manager as ``generate_batch`` builds it (hints, warm-up), started."""
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)),
                          max_generated_length=max(outputs), num_requests=len(prompts))
    manager = model.init_continuous_batching(
        generation_config=generation_config(temperature, max(outputs), force_length=False),
        continuous_batching_config=ContinuousBatchingConfig(use_cuda_graph=cuda_graphs),
        workload_hints=hints)
    manager.warmup()
    manager.start()
    return manager


def run_manager(manager, prompts: list[list[int]], outputs: list[int], tag: str,
                time_limit: float | None = None) -> RunStats:
    """Submits every request with its own max_new_tokens and waits for all of them, or until
    ``time_limit`` seconds, then hard-stops the manager and counts what was generated."""
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, outputs)):
        manager.add_request(prompt, request_id=f"{tag}{i}", max_new_tokens=n)
    results = {}
    deadline = None if time_limit is None else start + time_limit
    while len(results) < len(prompts):
        wait = 1.0 if deadline is None else min(1.0, deadline - time.perf_counter())
        if wait <= 0:
            break
        result = manager.get_result(timeout=wait)
        if result is not None and result.is_finished():
            results[result.request_id] = result
        elif result is None and not manager.is_running():
            raise RuntimeError("the continuous-batching thread stopped: "
                               f"{manager.background_thread_status.fatal_error!r}")
    seconds = time.perf_counter() - start
    timed_out = len(results) < len(prompts)
    if timed_out:
        manager.stop(block=True, timeout=60, hard_stop=True)
        while (result := manager.get_result(timeout=0.1)) is not None:
            results.setdefault(result.request_id, result)
    return count_tokens(results, outputs, tag, seconds, timed_out)


def count_tokens(results: dict, outputs: list[int], tag: str, seconds: float,
                 timed_out: bool) -> RunStats:
    completed = tokens = partial = wrong = 0
    for i, n in enumerate(outputs):
        result = results.get(f"{tag}{i}")
        if result is None:
            continue
        got = min(len(result.generated_tokens), n)
        tokens += got
        if result.error is None:
            completed += 1
            wrong += len(result.generated_tokens) != n
        else:
            partial += got
    return RunStats(seconds, completed, tokens, partial, wrong, timed_out)


def run_generate_batch(model, prompts: list[list[int]], outputs: list[int], temperature: float,
                       cuda_graphs: bool | None, time_limit: float | None) -> RunStats:
    manager = start_manager(model, prompts, outputs, temperature, cuda_graphs)
    try:
        run_manager(manager, prompts[:2], [4] * len(prompts[:2]), "warmup-")
        return run_manager(manager, prompts, outputs, "req-", time_limit)
    finally:
        if manager.is_running():
            manager.stop(block=True, timeout=60)
        manager.destroy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--workload", choices=["nano", "fixed"], default="nano")
    parser.add_argument("--num-requests", type=int)
    parser.add_argument("--first-request", type=int, default=0,
                        help="skip the workload's first N requests (a multiple of --group keeps "
                             "the static groups of a whole run, so a run can be split in parts)")
    parser.add_argument("--method", choices=["static", "generate_batch"], default="static")
    parser.add_argument("--group", type=int, default=64, help="static: requests per generate call")
    parser.add_argument("--attn-implementation", default="paged|sdpa",
                        help="generate_batch: the model's attention (paged|sdpa, paged|eager, ...)")
    parser.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                        help="generate_batch: CUDA graphs (auto: transformers decides)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="stop the timed run after S seconds and report what was generated")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    if args.num_requests is not None and args.num_requests < 1:
        parser.error("--num-requests must be positive")
    if args.first_request < 0:
        parser.error("--first-request must be >= 0")
    if args.time_limit is not None and not args.time_limit > 0:
        parser.error("--time-limit must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workload == "nano":
        prompts, outputs = nano_workload()
        temperature = 0.6
    else:
        prompts, outputs = fixed_workload()
        temperature = 0.0
    prompts, outputs = prompts[args.first_request:], outputs[args.first_request:]
    if not prompts:
        raise SystemExit(f"--first-request {args.first_request} skips every request")
    count = args.num_requests or len(prompts)
    prompts, outputs = prompts[:count], outputs[:count]
    model = load_random_model(args.model, args.device)
    if args.method == "static":
        run_static(model, prompts[:2], [4, 4], args.group, temperature, args.device)  # warm-up
        stats = run_static(model, prompts, outputs, args.group, temperature, args.device,
                           args.time_limit)
        extra = {"baseline": "hf static generate", "group": args.group}
    else:
        model.set_attn_implementation(args.attn_implementation)
        graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
        stats = run_generate_batch(model, prompts, outputs, temperature, graphs, args.time_limit)
        extra = {"baseline": "hf generate_batch (continuous batching)", "group": None,
                 "attn_implementation": args.attn_implementation, "cuda_graphs": args.cuda_graphs,
                 "per_request_max_new_tokens": True}
    result = {"device": device_name(args.device), "method": args.method, **extra,
              "workload": args.workload, "first_request": args.first_request,
              "num_requests": len(prompts),
              "output_tokens": stats.output_tokens, "seconds": stats.seconds,
              "output_tok_s": stats.output_tokens / stats.seconds,
              "requested_output_tokens": sum(outputs),
              "completed_requests": stats.completed_requests,
              "partial_tokens": stats.partial_tokens,
              "wrong_length_requests": stats.wrong_length_requests,
              "timed_out": stats.timed_out, "time_limit_s": args.time_limit,
              "torch": torch.__version__, "transformers": transformers.__version__}
    name = "hf" if args.method == "static" else "hf-generate_batch"
    emit(result, args.out, f"{name}-{args.workload}.json")


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


if __name__ == "__main__":
    main()
