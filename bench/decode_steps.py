"""Steady decode step time (BENCHMARKS.md "decode" workload) and where it goes.

    python bench/decode_steps.py --model bench/configs/llama3-8b --batches 1 16 64 256 --context 1024

For each batch size B: B requests with ``context``-token prompts are prefilled, then ``--steps``
decode steps are timed through the engine. Reported per step: wall time, the time the host spent
outside waiting for the device (scheduling, input packing, sampling set-up, detokenizing), and the
floor max(bytes / BW, FLOPs / F) with bytes = weights + the K/V of every context read.
``--kv-bytes`` sizes the pool (several values show whether step time depends on pool size, which it
must not). ``--dump-hlo`` writes the optimized HLO of the decode step of the largest batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from roofline import (kv_bytes_per_token, matmul_flops_per_token, measure_ceilings,  # noqa: E402
                      weight_bytes)

from jaxpaged import LLM, SamplingParams  # noqa: E402
from jaxpaged import runner as runner_module  # noqa: E402


def time_decode(llm: LLM, batch: int, context: int, steps: int) -> dict[str, float]:
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps + 8)
    for i in range(batch):
        prompt = [(7 * i + j) % 1000 + 10 for j in range(context)]
        engine.add_request(f"d{batch}-{i}", None, params, prompt_token_ids=prompt)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()
              ) or engine.scheduler.num_waiting:
        engine.step()
    for _ in range(2):
        engine.step()  # warm decode steps
    timings = engine.runner.timings
    before = (timings.total_s, timings.device_wait_s)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps
    total = (timings.total_s - before[0]) / steps
    wait = (timings.device_wait_s - before[1]) / steps
    engine.abort_request([f"d{batch}-{i}" for i in range(batch)])
    return {"step_ms": wall * 1e3, "host_ms": (total - wait) * 1e3, "device_wait_ms": wait * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kv-bytes", type=float, nargs="+", default=[0],
                        help="KV pool sizes in GiB (0 = gpu_memory_utilization 0.9)")
    parser.add_argument("--dump-hlo", action="store_true")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="overlap host work with the device (sampled ids applied one step late)")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    ceilings = measure_ceilings()
    results = []
    for kv_gib in args.kv_bytes:
        start = time.perf_counter()
        llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=args.context + 64,
                  max_num_seqs=max(args.batches), max_num_batched_tokens=8192,
                  kv_cache_memory_bytes=int(kv_gib * 2**30) or None,
                  async_scheduling=args.async_scheduling)
        startup = time.perf_counter() - start
        cfg = llm.llm_engine.model_config
        for batch in args.batches:
            row = time_decode(llm, batch, args.context, args.steps)
            step_bytes = weight_bytes(cfg) + batch * (args.context + 1) * kv_bytes_per_token(cfg)
            floor = max(step_bytes / ceilings.bandwidth,
                        batch * matmul_flops_per_token(cfg) / ceilings.matmul_flops)
            row.update(batch=batch, kv_gib=kv_gib, startup_s=startup, floor_ms=floor * 1e3,
                       step_over_floor=row["step_ms"] / (floor * 1e3))
            results.append(row)
            print(json.dumps(row), flush=True)
        if args.dump_hlo and args.out:
            dump_hlo(llm, max(args.batches), args.out)
        del llm
        gc.collect()  # free the pool before the next size is planned
    summary = {"device": jax.devices()[0].device_kind, "async_scheduling": args.async_scheduling,
               "bandwidth_TBps": ceilings.bandwidth / 1e12,
               "matmul_TFLOPps": ceilings.matmul_flops / 1e12, "context": args.context,
               "rows": results}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_steps.json").write_text(json.dumps(summary, indent=2))


def dump_hlo(llm: LLM, batch: int, out: pathlib.Path) -> None:
    runner = llm.llm_engine.runner
    shape = runner.ladder.shape_for(batch, batch, decode_only=True)
    inputs = runner_module.pack_step([], shape, block_size=runner.block_size,
                                     table_width=runner.ladder.table_width)
    text = runner_module._model_step.lower(runner.graphdef, runner.state, runner.kv_cache,
                                           inputs).compile().as_text()
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_step_hlo.txt").write_text(text[:15_000_000])


if __name__ == "__main__":
    main()
