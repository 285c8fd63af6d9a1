"""Steady decode step time (BENCHMARKS.md "decode" workload) and where it goes.

    python bench/decode_steps.py --model bench/configs/llama3-8b --batches 1 16 64 256 --context 1024

For each batch size B: B requests with ``context``-token prompts are prefilled, then ``--steps``
decode steps are timed through the engine. Reported per step: wall time, the time the host spent
outside waiting for the device (scheduling, input packing, sampling set-up, detokenizing), and the
floor max(bytes / BW, FLOPs / F) with bytes = weights + the K/V of every context read.
``--tensor-parallel-size N`` shards the model over N GPUs (``-tp``). ``--kv-bytes`` sizes the pool
(per GPU) (several values show whether step time depends on pool size, which it
must not). ``--dump-hlo`` writes the optimized HLO of the decode step of the largest batch.

``device_ms`` replays the last timed step's compiled model step and sampler back to back with no
host work between them (same inputs, same pool): the device's own time per step. The GPU waits for
Python for ``1 - device_ms / step_ms`` of a step (BENCHMARKS.md "host overhead").
``--trace`` writes the device's kernels per replayed step of each batch (``kernels_B.txt``, see
``gpu_trace``) to ``--out``; ``--profile`` writes a cProfile of the timed steps of each batch (``profile_B.txt``) to ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pathlib
import pstats
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpu_trace import with_kernel_table  # noqa: E402
from roofline import (kv_bytes_per_token, matmul_flops_per_token, measure_ceilings,  # noqa: E402
                      weight_bytes)

from jaxpaged import LLM, SamplingParams  # noqa: E402
from jaxpaged.runner import model_runner as runner_module  # noqa: E402
from jaxpaged.sampling_params import RequestOutputKind  # noqa: E402


class StepRecorder:
    """Keeps the last dispatched step's model inputs and sampler arguments, for ``replay``."""

    def __init__(self, runner: runner_module.ModelRunner):
        self.runner = runner
        self.last_inputs = None
        self.last_sample: tuple | None = None
        run_model, run_sampler = runner._run_model, runner._run_sampler

        def record_model(inputs, prev_ids):
            self.last_inputs = (inputs, prev_ids)
            return run_model(inputs, prev_ids)

        def record_sampler(logits, rows, tensors):
            self.last_sample = (rows, tensors)
            return run_sampler(logits, rows, tensors)

        runner._run_model, runner._run_sampler = record_model, record_sampler
        self._run_model, self._run_sampler = run_model, run_sampler

    def replay(self, steps: int) -> float:
        """Seconds per step of the last model step + sampler, dispatched back to back (the host
        only re-sends the same packed arrays: a few tens of microseconds per step)."""
        out = None
        for i in range(steps + 2):
            if i == 2:
                jax.block_until_ready(out)
                start = time.perf_counter()
            logits, _ = self._run_model(*self.last_inputs)
            out = self._run_sampler(logits, *self.last_sample)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / steps


MAX_NEW_TOKENS = 63  # room for prefill steps of the largest batch, 2 warm and the timed steps


def time_decode(llm: LLM, batch: int, context: int, steps: int,
                recorder: StepRecorder, profile_to: pathlib.Path | None = None,
                trace_to: pathlib.Path | None = None) -> dict[str, float]:
    engine = llm.llm_engine
    # DELTA outputs, as a streaming server asks for them
    # No request may finish before the timed steps end: the first ones decode while the last
    # ones are still prefilled (max_model_len leaves room for MAX_NEW_TOKENS).
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=MAX_NEW_TOKENS,
                            output_kind=RequestOutputKind.DELTA)
    for i in range(batch):
        prompt = [(7 * i + j) % 1000 + 10 for j in range(context)]
        engine.add_request(f"d{batch}-{i}", None, params, prompt_token_ids=prompt)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()
              ) or engine.scheduler.num_waiting:
        engine.step()
    for _ in range(2):
        engine.step()  # warm decode steps
    running = engine.scheduler.running
    if len(running) != batch or engine.scheduler.num_waiting:
        raise RuntimeError(f"only {len(running)} of {batch} requests run at once: the KV pool is "
                           "too small for this batch and context (raise --kv-bytes)")
    left = min(MAX_NEW_TOKENS - r.num_output_tokens for r in running)
    if left <= steps + 1:
        raise RuntimeError(f"a request would finish within the {steps} timed steps ({left} tokens "
                           "left): fewer --steps")
    timings = engine.runner.timings
    before = (timings.total_s, timings.device_wait_s)
    profiler = cProfile.Profile() if profile_to else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    for _ in range(steps):
        engine.step()
    if profiler:
        profiler.disable()
    wall = (time.perf_counter() - start) / steps
    total = (timings.total_s - before[0]) / steps
    wait = (timings.device_wait_s - before[1]) / steps
    engine.abort_request([f"d{batch}-{i}" for i in range(batch)])
    while engine.has_unfinished_requests():
        engine.step()
    device = recorder.replay(steps)
    if trace_to:
        trace_to.mkdir(parents=True, exist_ok=True)
        (trace_to / f"kernels_{batch}.txt").write_text(
            with_kernel_table(lambda: recorder.replay(steps), steps + 2))  # replay runs 2 more
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        profile_to.mkdir(parents=True, exist_ok=True)
        (profile_to / f"profile_{batch}.txt").write_text(text.getvalue())
    return {"step_ms": wall * 1e3, "host_ms": (total - wait) * 1e3, "device_wait_ms": wait * 1e3,
            "device_ms": device * 1e3, "gpu_idle_pct": 100 * max(0.0, 1 - device / wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-model-len", type=int, default=4096,
                        help="as the nano workload (it sets the block-table width, and with it "
                             "the decode kernel's KV splits)")
    parser.add_argument("--kv-bytes", type=float, nargs="+", default=[0],
                        help="KV pool sizes in GiB (0 = gpu_memory_utilization 0.9)")
    parser.add_argument("--quantization", choices=["fp8", "int8"], default=None,
                        help="quantized projection weights (the floor counts their bytes)")
    parser.add_argument("--quant-matmul-kernel", default="auto",
                        help="quantized models: the projections' kernel (auto: by token count)")
    parser.add_argument("--dump-hlo", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="overlap host work with the device (sampled ids applied one step late)")
    parser.add_argument("--profile", type=int, nargs="*", default=[],
                        help="batch sizes whose timed steps are cProfiled")
    parser.add_argument("--trace", type=int, nargs="*", default=[],
                        help="batch sizes whose replayed steps are traced kernel by kernel")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="GPUs of this host to shard the model over (the floor stays the "
                             "one-GPU floor: step_over_floor then shows the speed-up)")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    if args.context + MAX_NEW_TOKENS > args.max_model_len:
        parser.error(f"--context + {MAX_NEW_TOKENS} new tokens must fit --max-model-len")
    ceilings = measure_ceilings()
    results = []
    for kv_gib in args.kv_bytes:
        start = time.perf_counter()
        llm = LLM(args.model, load_format="dummy", dtype="bfloat16",
                  max_model_len=args.max_model_len,
                  max_num_seqs=max(args.batches), max_num_batched_tokens=8192,
                  kv_cache_memory_bytes=int(kv_gib * 2**30) or None,
                  async_scheduling=args.async_scheduling, quantization=args.quantization,
                  quant_matmul_kernel=args.quant_matmul_kernel,
                  tensor_parallel_size=args.tensor_parallel_size)
        startup = time.perf_counter() - start
        cfg = llm.llm_engine.model_config
        recorder = StepRecorder(llm.llm_engine.runner)
        for batch in args.batches:
            row = time_decode(llm, batch, args.context, args.steps, recorder,
                              args.out if batch in args.profile else None,
                              args.out if batch in args.trace else None)
            step_bytes = (weight_bytes(cfg, quantization=args.quantization)
                          + batch * (args.context + 1) * kv_bytes_per_token(cfg))
            floor = max(step_bytes / ceilings.bandwidth,
                        batch * matmul_flops_per_token(cfg) / ceilings.matmul_flops)
            row.update(batch=batch, kv_gib=kv_gib, tensor_parallel_size=args.tensor_parallel_size,
                       startup_s=startup, floor_ms=floor * 1e3,
                       step_over_floor=row["step_ms"] / (floor * 1e3))
            results.append(row)
            print(json.dumps(row), flush=True)
        if args.dump_hlo and args.out:
            dump_hlo(llm, max(args.batches), args.out)
        del llm
        gc.collect()  # free the pool before the next size is planned
    summary = {"device": jax.devices()[0].device_kind, "async_scheduling": args.async_scheduling,
               "tensor_parallel_size": args.tensor_parallel_size,
               "bandwidth_TBps": ceilings.bandwidth / 1e12,
               "matmul_TFLOPps": ceilings.matmul_flops / 1e12, "context": args.context,
               "quantization": args.quantization, "quant_matmul_kernel": args.quant_matmul_kernel,
               "rows": results}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"decode_steps{_tp_suffix(args.tensor_parallel_size)}.json").write_text(json.dumps(summary, indent=2))


def _tp_suffix(size: int) -> str:
    return "" if size == 1 else f"-tp{size}"


def dump_hlo(llm: LLM, batch: int, out: pathlib.Path) -> None:
    runner = llm.llm_engine.runner
    shape = runner.ladder.shape_for(batch, batch, decode_only=True)
    inputs = runner_module.pack_step([], shape, block_size=runner.block_size,
                                     table_width=runner.ladder.table_width)
    packed, layout = runner_module.bundle(inputs)
    text = runner._executable(layout, packed).as_text()
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_step_hlo.txt").write_text(text[:15_000_000])


if __name__ == "__main__":
    main()
