"""Offline throughput of jaxpaged (BENCHMARKS.md "nano" and "fixed" workloads), with the floor.

    python bench/throughput.py --model bench/configs/llama3-8b --workload nano --out OUT

Random ("dummy") bf16 weights of the config's shapes are made on the device. One warm-up generate
precedes the timed one. Prints output tok/s, total tok/s, the workload's floor on this GPU
(bench/roofline.py, measured in the same run) and the efficiency floor / measured. With
``--kv-waste`` the run drives the engine step by step and reports KV waste: allocated but
unused slots / allocated slots, averaged over steps. ``--trace`` then runs the workload once more
under the JAX profiler and writes the GPU time of the whole run by kernel, then its idle time by
the engine's host phase open meanwhile and by gap length (``kernels_WORKLOAD.txt``,
``bench/gpu_trace.py``); the timed run is not traced. The second pass finds every prompt in the
prefix cache, so its tables are the decode part of the workload (plus each prompt's last partial
block).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from roofline import measure_ceilings, workload_floor  # noqa: E402
from workloads import add_throughput_run_args, throughput_requests  # noqa: E402
from report import emit  # noqa: E402
from gpu_trace import with_kernel_table  # noqa: E402

from jaxpaged import LLM, SamplingParams  # noqa: E402


def build_requests(workload: str, num_requests: int | None):
    requests = throughput_requests(workload, num_requests)
    params = [SamplingParams(temperature=requests.temperature, ignore_eos=True, max_tokens=n)
              for n in requests.output_lens]
    return [{"prompt_token_ids": p} for p in requests.prompts], params, requests.output_lens


def run_with_kv_waste(llm: LLM, prompts, params) -> tuple[float, float, int]:
    """Drives the engine by hand; returns (seconds, mean KV waste, steps)."""
    engine = llm.llm_engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"bench-{i}", None, p, prompt_token_ids=prompt["prompt_token_ids"])
    wastes = []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        allocated, used = engine.kv_slot_usage()
        if allocated:
            wastes.append(1 - used / allocated)
    return time.perf_counter() - start, sum(wastes) / max(len(wastes), 1), len(wastes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    add_throughput_run_args(parser)
    parser.add_argument("--kv-waste", action="store_true")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8, fp8_e5m2 (vLLM's)")
    parser.add_argument("--quantization", choices=["fp8", "int8"], default=None,
                        help="quantized projection weights (vLLM's --quantization)")
    parser.add_argument("--quant-matmul-kernel", default="auto",
                        help="quantized models: the projections' kernel (auto: by token count)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="overlap host work with the device (sampled ids applied one step late)")
    parser.add_argument("--trace", action="store_true",
                        help="run the workload again under the profiler; write its kernel table")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="GPUs of this host to shard the model over")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    ceilings = measure_ceilings()  # before the engine takes the memory
    start = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization,
              async_scheduling=args.async_scheduling, kv_cache_dtype=args.kv_cache_dtype,
              quantization=args.quantization, quant_matmul_kernel=args.quant_matmul_kernel,
              tensor_parallel_size=args.tensor_parallel_size)
    startup = time.perf_counter() - start
    prompts, params, outputs = build_requests(args.workload, args.num_requests)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    waste = steps = None
    if args.kv_waste:
        elapsed, waste, steps = run_with_kv_waste(llm, prompts, params)
    else:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    output_tokens = sum(outputs)
    floor = workload_floor(llm.llm_engine.model_config,
                           [len(p["prompt_token_ids"]) for p in prompts], outputs, ceilings,
                           kv_itemsize=llm.llm_engine.kv_dtype.itemsize,
                           quantization=args.quantization)
    result = {
        "device": jax.devices()[0].device_kind, "workload": args.workload,
        "num_requests": len(prompts), "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens, "seconds": elapsed,
        "output_tok_s": output_tokens / elapsed,
        "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
        "bandwidth_TBps": ceilings.bandwidth / 1e12,
        "matmul_TFLOPps": ceilings.matmul_flops / 1e12,
        "floor": floor, "efficiency": floor["floor_s"] / elapsed,
        "startup_s": startup, "async_scheduling": args.async_scheduling,
        "tensor_parallel_size": args.tensor_parallel_size,
        "kv_capacity_tokens": llm.llm_engine.kv_plan.capacity_tokens,
        "kv_cache_dtype": llm.llm_engine.kv_dtype.name,
        "quantization": args.quantization, "quant_matmul_kernel": args.quant_matmul_kernel,
        "kv_waste": waste, "steps": steps,
        "preemptions": llm.llm_engine.scheduler.num_preemptions,
    }
    emit(result, args.out, f"throughput-{args.workload}.json")
    if args.trace and args.out:
        table = with_kernel_table(lambda: llm.generate(prompts, params, use_tqdm=False), steps=1,
                                  top=60)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"kernels_{args.workload}.txt").write_text(table)


if __name__ == "__main__":
    main()
