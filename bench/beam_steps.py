"""Where the time of a beam search step goes: host work against waiting for the device.

    .venv/bin/python bench/beam_steps.py                      # tiny model on the CPU
    .venv/bin/python bench/beam_steps.py --profile /tmp/p.txt # plus a cProfile of the timed run
    python3 bench/beam_steps.py --model bench/configs/llama3-8b --load-format dummy \
        --dtype bfloat16 --prompt-len 128 --max-tokens 128     # the GPU workload's shape

``--num-prompts`` random-token prompts (``bench/workloads.beam_workload``) are searched with
``--beam-width`` beams for ``--max-tokens`` steps, EOS ignored, after a short warm-up search.
Reported per engine step of the timed search (the engine's ``StepTimings``): wall ms, the ms
blocked on the device's sampled ids, and host ms (the rest: scheduling, packing, beam selection,
forks, block copies, results). With async scheduling (the default) beam steps are pipelined
(``LLMEngine._step_beams``): a step applies the previous step's beam rows, dispatches itself, then
does the rest while the device runs. ``gap_ms`` is the part of a step the device surely idles:
from the previous step's ids on the host to this step queued (selection, forks, block copies,
scheduling, packing, dispatch); a step takes about device time + gap. ``model_gap_ms`` is the part
of it until the model step is queued: the sampler's inputs are built and dispatched after that,
while an accelerator runs the model step (on the CPU the model step's threads compete with that
host work instead). The groups' results are built when taken, after the last step. ``compilations`` counts the JAX lowerings and compiles
during the timed search: it must be 0 (a beam step compiles nothing after warm-up).
``--trace DIR`` then runs the search once more on other prompts under the JAX profiler and writes
the GPU's kernels per step and its idle time by the engine's host phase open meanwhile
(``beam-kernels-wN.txt``, ``bench/gpu_trace.py``); the timed search is not traced.
"""

from __future__ import annotations

import argparse
import cProfile
import pathlib
import pstats
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpu_trace import with_kernel_table  # noqa: E402
from report import emit  # noqa: E402
from workloads import beam_workload  # noqa: E402

from jaxpaged import LLM, BeamSearchParams  # noqa: E402
from jaxpaged.converters.tiny import tiny_model_dir  # noqa: E402

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the tiny test model")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--compile-step-shapes", default="auto")
    parser.add_argument("--profile", type=pathlib.Path, help="write a cProfile of the timed run")
    parser.add_argument("--trace", type=pathlib.Path,
                        help="write the kernel and idle tables of a traced search here")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    model = args.model or str(tiny_model_dir())
    llm = LLM(model, load_format=args.load_format, dtype=args.dtype,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=0,
              compile_step_shapes=args.compile_step_shapes)
    engine = llm.llm_engine
    width = args.beam_width
    params = BeamSearchParams(width, args.max_tokens, ignore_eos=True)
    # warm-up: the same search on other prompts (no prefix-cache hits), so every step shape and
    # copy size of the timed search has been met
    llm.beam_search(_prompts(args, engine, seed=1), params)
    prompts = _prompts(args, engine, seed=0)
    compilations: list[str] = []
    timing = True
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: timing and event in COMPILE_EVENTS
        and compilations.append(event))
    timings = engine.runner.timings
    steps, total, wait = timings.steps, timings.total_s, timings.device_wait_s
    gap, model_gap = timings.beam_gap_s, timings.beam_model_gap_s
    jax.config.update("jax_log_compiles", True)  # what compiles, if anything, is logged
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    outputs = llm.beam_search(prompts, params)
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - start
    timing = False
    n = timings.steps - steps
    step_s, wait_s = (timings.total_s - total) / n, (timings.device_wait_s - wait) / n
    gap_s = (timings.beam_gap_s - gap) / n
    model_gap_s = (timings.beam_model_gap_s - model_gap) / n
    if profiler:
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        with args.profile.open("w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(60)
    tokens = sum(len(s.tokens) - args.prompt_len for o in outputs for s in o.sequences)
    emit({"device": jax.devices()[0].device_kind, "beam_width": width,
          "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
          "max_tokens": args.max_tokens, "steps": n, "seconds": elapsed,
          "output_tok_s": tokens / elapsed, "step_ms": 1e3 * step_s,
          "device_wait_ms": 1e3 * wait_s, "host_ms": 1e3 * (step_s - wait_s), "gap_ms": 1e3 * gap_s,
          "model_gap_ms": 1e3 * model_gap_s,
          "compilations": len(compilations)}, args.out, f"beam-steps-w{width}.json")
    if compilations:
        raise SystemExit(f"{len(compilations)} compilations during the timed beam search")
    if args.trace:
        traced = _prompts(args, engine, seed=2)
        table = with_kernel_table(lambda: llm.beam_search(traced, params), steps=n)
        args.trace.mkdir(parents=True, exist_ok=True)
        (args.trace / f"beam-kernels-w{width}.txt").write_text(table + "\n")


def _prompts(args, engine, seed: int) -> list[dict]:
    vocab_size = engine.model_config.vocab_size
    prompts = beam_workload(args.num_prompts, args.prompt_len, vocab_size, seed=seed)
    if vocab_size < 500:  # the tiny model: ids its tokenizer decodes
        prompts = [[5 + t % 400 for t in p] for p in prompts]
    return [{"prompt_token_ids": p} for p in prompts]


if __name__ == "__main__":
    main()
