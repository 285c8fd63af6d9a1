"""Structured outputs on the GPU: step time with a fraction of the requests constrained by a JSON
schema (token bitmask filled by llguidance on the host, masked in the jitted sampler) against the
same requests unconstrained, at one batch size.

    python bench/structured.py --structured-fraction 0.5 --max-num-seqs 64 --out OUT

Random ("dummy") bf16 weights of the config's shapes; the tokenizer is ``--tokenizer DIR`` (a
Hugging Face tokenizer directory), by default the tiny test checkpoint's byte-level BPE (a few
hundred tokens: the host's mask work grows with the tokenizer's vocabulary, so pass a real one for
a representative host cost). Each run drives the engine step by step over the first
``--num-requests`` nano prompts; constrained rows end when their JSON completes, so the runs are
compared per step. Reported per run: steps, mean step seconds, output tokens per second, the
host time per step the device may sit idle (``StepTimings.host_s``: the step's wall time minus
its wait for the device) and its share of the wall time, and the XLA compilations seen during the
timed run (none is expected: the bitmask sampler variants compile at warm-up).
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
from report import emit  # noqa: E402
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


def run(llm: LLM, prompts, params, tag: str) -> dict:
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
    output_tokens, stopped = 0, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                output_tokens += len(out.outputs[0].token_ids)
                stopped += out.outputs[0].finish_reason == "stop"
    seconds = time.perf_counter() - start
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
            "compilations": len(compilations)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: tiny BPE)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--structured-fraction", type=float, default=0.5)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-output", type=int, default=None,
                        help="cap the nano output lengths (quick runs)")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    if not 0.0 <= args.structured_fraction <= 1.0:
        raise SystemExit(f"--structured-fraction must be in [0, 1], got {args.structured_fraction}")
    tokenizer = args.tokenizer or tiny_tokenizer_dir()
    model = args.model if args.tokenizer else with_tokenizer_ids(args.model, tokenizer)
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
    run(llm, prompts, plain, "warm")  # first runs of every step shape (autotuning, allocation)
    result = {"device": jax.devices()[0].device_kind, "batch": args.max_num_seqs,
              "structured_fraction": args.structured_fraction,
              "unconstrained": run(llm, prompts, plain, "plain"),
              "structured": run(llm, prompts, constrained, "json")}
    result["step_time_ratio"] = (result["structured"]["step_ms"]
                                 / result["unconstrained"]["step_ms"])
    emit(result, args.out, "structured.json")


if __name__ == "__main__":
    main()
