"""The host's critical path per step with and without structured outputs, on any machine (CPU
included): a small random model with a real model's vocabulary (so llguidance's mask work has its
real size), half the requests under ``structured.py``'s JSON schema, and ``DispatchTimeline``'s
per-step numbers for both runs.

    python bench/structured_timeline.py --num-requests 64 --max-num-seqs 64 --out OUT

``model_path_ms`` is the host time the device's queue must cover (model k - 1 + sampler k - 1 of
device time): the GPU idles when it is longer. ``sampler_gap_ms`` is the time from a sampler's
launch to the next model's launch, and ``scheduled_in_gap`` counts the steps whose scheduling
happened in that gap (with grammars, the pipelined engine schedules before the gap)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from dispatch_timeline import DispatchTimeline  # noqa: E402
from report import emit  # noqa: E402
from structured import SCHEMA, requests  # noqa: E402
from synthetic_tokenizer import write_synthetic_tokenizer  # noqa: E402

from jaxpaged import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def small_model(base: str, directory: pathlib.Path) -> str:
    """``base``'s config (vocabulary, special ids) with tiny layers."""
    config = json.loads((pathlib.Path(base) / "config.json").read_text())
    config.update(SMALL)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def run(llm: LLM, prompts, params, tag: str) -> dict:
    engine = llm.llm_engine
    timeline = DispatchTimeline(engine)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"{tag}-{i}", None, p, prompt_token_ids=prompt["prompt_token_ids"])
    while engine.has_unfinished_requests():
        engine.step()
    return timeline.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b",
                        help="the config whose vocabulary and special ids are used")
    parser.add_argument("--structured-fraction", type=float, default=0.5)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=160)
    parser.add_argument("--max-output", type=int, default=96)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    if not 0.0 <= args.structured_fraction <= 1.0:
        raise SystemExit(f"--structured-fraction must be in [0, 1], got {args.structured_fraction}")
    work = pathlib.Path(tempfile.mkdtemp())
    model = small_model(args.model, work / "model")
    vocab_size = json.loads((pathlib.Path(model) / "config.json").read_text())["vocab_size"]
    tokenizer = str(write_synthetic_tokenizer(work / "tokenizer", vocab_size))
    llm = LLM(model, load_format="dummy", dtype="float32", max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=2048, tokenizer=tokenizer,
              seed=0)
    prompts, constrained = requests(args.num_requests, args.structured_fraction, vocab_size,
                                    args.max_model_len, args.max_output)
    plain = [dataclasses.replace(p, structured_outputs=None) for p in constrained]
    warm = SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False,
                          structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.generate(prompts[:2], warm, use_tqdm=False)  # the grammar compiles (cached by schema)
    run(llm, prompts, plain, "warm")  # every step shape's first run
    result = {"vocab_size": vocab_size, "batch": args.max_num_seqs,
              "unconstrained": run(llm, prompts, plain, "plain"),
              "structured": run(llm, prompts, constrained, "json")}
    emit(result, args.out, "structured_timeline.json")


if __name__ == "__main__":
    main()
