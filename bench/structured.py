"""Structured outputs on the GPU: step time with a fraction of the requests constrained by a JSON
schema (token bitmask filled by llguidance on the host, masked in the jitted sampler) against the
same requests unconstrained, at one batch size, and how long the GPU waits for the host.

    python bench/structured.py --structured-fraction 0.5 --max-num-seqs 64 --out OUT

Random ("dummy") bf16 weights of the config's shapes. The host's mask work grows with the
vocabulary, so the tokenizer is by default a synthetic byte-level BPE of the model's own size
(``synthetic_tokenizer``: 128,256 ids with Llama 3's special ids for llama3-8b); ``--tokenizer
tiny`` takes the tiny test checkpoint's (442 ids), ``--tokenizer DIR`` a Hugging Face tokenizer
directory. Each run drives the engine step by step over the first ``--num-requests`` nano
prompts; constrained rows end when their JSON completes, so the runs are compared per step.

Reported per run: steps, mean step seconds, output tokens per second, the host time per step
(``StepTimings.host_s``: the step's wall time minus its wait for the device) and its share of the
wall time, the XLA compilations seen during the timed run (none is expected: the bitmask sampler
variants compile at warm-up), and the GPU's idle time: steps ``--trace-after`` to
``--trace-after + --trace-steps`` of each run are traced with the JAX profiler, and the time in
that window when no kernel ran (``gpu_trace.device_activity``) is reported per step and as a share
of the window (``gpu_idle_ms_per_step``, ``gpu_idle_pct``; launch gaps between kernels included,
so the unconstrained run gives the baseline). That idle time is also split by the engine's host
phase open meanwhile (``gpu_idle_ms_per_step_by_host_phase``, ``gpu_trace.idle_by_host_phase``)
and by gap length. None on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpu_trace import read_activity  # noqa: E402
from report import emit  # noqa: E402
from synthetic_tokenizer import write_synthetic_tokenizer  # noqa: E402
from workloads import nano_workload  # noqa: E402

from jaxpaged import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

SCHEMA = {  # nested objects, arrays, enums and bounded strings; long enough to last many steps
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 64},
        "kind": {"enum": ["report", "note", "list"]},
        "items": {"type": "array", "maxItems": 32,
                  "items": {"type": "object",
                            "properties": {"name": {"type": "string", "maxLength": 32},
                                           "count": {"type": "integer"},
                                           "tags": {"type": "array", "maxItems": 4,
                                                    "items": {"type": "string",
                                                              "maxLength": 12}}},
                            "required": ["name", "count", "tags"]}},
    },
    "required": ["title", "kind", "items"],
}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def tiny_tokenizer_dir() -> str:
    from jaxpaged.converters.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint("llama3-rope", pathlib.Path(tempfile.mkdtemp()) / "tiny"))


def with_tokenizer_ids(model_dir: str, tokenizer_dir: str) -> str:
    """A copy of ``model_dir``'s config.json whose BOS/EOS ids are the tokenizer's (the tiny BPE
    has a few hundred ids: the model's own EOS would lie outside its vocabulary)."""
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    ids = json.loads((pathlib.Path(tokenizer_dir) / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        config[key] = ids[key]
    out = pathlib.Path(tempfile.mkdtemp()) / "model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def requests(num_requests: int, fraction: float, vocab_size: int, max_model_len: int,
             max_output: int | None):
    """The first nano prompts (ids modulo the vocabulary, cut to fit the context: no-ops for
    llama3-8b at 4096), with the constrained ones spread evenly over the batch."""
    prompts, outputs = nano_workload()
    outputs = [min(n, max_output or n) for n in outputs[:num_requests]]
    prompts = [[t % vocab_size for t in p][:max_model_len - n]
               for p, n in zip(prompts[:num_requests], outputs)]
    count = round(num_requests * fraction)
    chosen = {int(k * num_requests / count) for k in range(count)} if count else set()
    params = []
    for i, max_tokens in enumerate(outputs):
        grammar = (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
                   if i in chosen else None)
        params.append(SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens,
                                     detokenize=False, structured_outputs=grammar))
    return [{"prompt_token_ids": p} for p in prompts], params


class StepWindowTrace:
    """Traces steps ``first`` to ``first + count`` of a run with the JAX profiler (device
    activity only: no Python tracing, which would slow the host it measures)."""

    def __init__(self, first: int, count: int):
        self.first, self.count = first, count
        self.traced = 0  # steps traced
        self._directory: tempfile.TemporaryDirectory | None = None
        self.activity = None
        self.idle = None  # gpu_trace.IdleReport

    def before_step(self, step: int) -> None:
        if step == self.first and self.count > 0:
            self._directory = tempfile.TemporaryDirectory()
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0
            options.host_tracer_level = 1
            jax.profiler.start_trace(self._directory.name, profiler_options=options)
        elif step == self.first + self.count:
            self.stop()
        if self._directory is not None:
            self.traced += 1

    def stop(self) -> None:
        if self._directory is None:
            return
        jax.profiler.stop_trace()
        self.activity, self.idle = read_activity(self._directory.name)
        self._directory.cleanup()
        self._directory = None

    def report(self) -> dict:
        if self.activity is None:
            return {"traced_steps": self.traced, "gpu_busy_ms_per_step": None,
                    "gpu_idle_ms_per_step": None, "gpu_idle_pct": None}
        per_step = 1e-6 / max(self.traced, 1)
        return {"traced_steps": self.traced,
                "gpu_busy_ms_per_step": self.activity.busy_ns * per_step,
                "gpu_idle_ms_per_step": self.activity.idle_ns * per_step,
                "gpu_idle_pct": 100 * self.activity.idle_ns / max(self.activity.span_ns, 1),
                "gpu_idle_ms_per_step_by_host_phase": self.idle.per_step_ms(self.traced),
                "gpu_idle_by_gap_length": {label: {"per_step": count / max(self.traced, 1),
                                                   "ms_per_step": ns * per_step}
                                           for label, (count, ns) in
                                           self.idle.by_length.items()}}


def run(llm: LLM, prompts, params, tag: str, trace: StepWindowTrace) -> dict:
    engine = llm.llm_engine
    compilations = []
    recording = [True]

    def listen(event, duration, **kwargs):
        if recording[0] and event in COMPILE_EVENTS:
            compilations.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    before = dataclasses.replace(engine.runner.timings)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"{tag}-{i}", None, p, prompt_token_ids=prompt["prompt_token_ids"])
    output_tokens, stopped, step = 0, 0, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        trace.before_step(step)
        step += 1
        for out in engine.step():
            if out.finished:
                output_tokens += len(out.outputs[0].token_ids)
                stopped += out.outputs[0].finish_reason == "stop"
    seconds = time.perf_counter() - start
    trace.stop()
    recording[0] = False
    after = engine.runner.timings
    steps = after.steps - before.steps
    host_s = after.host_s - before.host_s
    return {"requests": len(prompts),
            "constrained": sum(p.structured_outputs is not None for p in params),
            "finished_by_grammar": stopped, "steps": steps, "seconds": seconds,
            "step_ms": 1e3 * seconds / max(steps, 1),
            "output_tok_s": output_tokens / seconds,
            "host_ms_per_step": 1e3 * host_s / max(steps, 1),
            "host_share": host_s / max(after.total_s - before.total_s, 1e-9),
            "compilations": len(compilations), **trace.report()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--tokenizer", default="synthetic",
                        help="'synthetic' (the model's vocabulary size), 'tiny' or an HF "
                             "tokenizer dir")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--structured-fraction", type=float, default=0.5)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-output", type=int, default=None,
                        help="cap the nano output lengths (quick runs)")
    parser.add_argument("--trace-after", type=int, default=32,
                        help="the first traced step of each run (the batch full by then)")
    parser.add_argument("--trace-steps", type=int, default=64, help="steps traced (0: none)")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    if not 0.0 <= args.structured_fraction <= 1.0:
        raise SystemExit(f"--structured-fraction must be in [0, 1], got {args.structured_fraction}")
    model, tokenizer = args.model, args.tokenizer
    if tokenizer == "tiny":
        tokenizer = tiny_tokenizer_dir()
        model = with_tokenizer_ids(args.model, tokenizer)
    elif tokenizer == "synthetic":
        vocab_size = json.loads((pathlib.Path(model) / "config.json").read_text())["vocab_size"]
        tokenizer = str(write_synthetic_tokenizer(pathlib.Path(tempfile.mkdtemp()) / "tokenizer",
                                                  vocab_size))
    llm = LLM(model, load_format="dummy", dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              tokenizer=tokenizer)
    prompts, constrained = requests(args.num_requests, args.structured_fraction,
                                    llm.llm_engine.model_config.vocab_size, args.max_model_len,
                                    args.max_output)
    plain = [dataclasses.replace(p, structured_outputs=None) for p in constrained]
    warm = SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False,
                          structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.generate(prompts[:2], warm, use_tqdm=False)  # the grammar compiles (cached by schema)
    # first runs of every step shape (autotuning, allocation)
    run(llm, prompts, plain, "warm", StepWindowTrace(0, 0))

    def window() -> StepWindowTrace:
        return StepWindowTrace(args.trace_after, args.trace_steps)
    result = {"device": jax.devices()[0].device_kind, "batch": args.max_num_seqs,
              "structured_fraction": args.structured_fraction,
              "vocab_size": llm.llm_engine.model_config.vocab_size,
              "tokenizer_size": len(llm.get_tokenizer()),
              "unconstrained": run(llm, prompts, plain, "plain", window()),
              "structured": run(llm, prompts, constrained, "json", window())}
    result["step_time_ratio"] = (result["structured"]["step_ms"]
                                 / result["unconstrained"]["step_ms"])
    emit(result, args.out, "structured.json")
    print(summary(result))


def summary(result: dict) -> str:
    """One line: step times, their ratio, and the GPU's idle time per step in both runs."""
    plain, json_run = result["unconstrained"], result["structured"]

    def idle(r: dict) -> str:
        if r["gpu_idle_ms_per_step"] is None:
            return "n/a (no GPU trace)"
        return f"{r['gpu_idle_ms_per_step']:.3f} ms ({r['gpu_idle_pct']:.1f}%)"
    return (f"summary: step {json_run['step_ms']:.3f} ms with grammars vs {plain['step_ms']:.3f} "
            f"ms without (ratio {result['step_time_ratio']:.3f}); GPU idle per step "
            f"{idle(json_run)} vs {idle(plain)} over {json_run['traced_steps']} traced steps; "
            f"host {json_run['host_ms_per_step']:.3f} vs {plain['host_ms_per_step']:.3f} ms per "
            f"step; vocabulary {result['tokenizer_size']} tokens")


if __name__ == "__main__":
    main()
