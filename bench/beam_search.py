"""Beam search throughput of the engine (``LLM.beam_search``, beams sharing KV blocks).

Random ("dummy") bf16 weights of the config's shapes (Llama-3-8B by default); ``--num-prompts``
random-token prompts of ``--prompt-len`` tokens, each searched with every ``--beam-widths`` value
for ``--max-tokens`` steps, EOS ignored (every beam runs to the end, as in the HF baseline
``bench/hf_beam_baseline.py``, which counts tokens the same way). output_tok_s counts the
tokens of the returned beams: num_prompts x beam_width x max_tokens per second.

    python bench/beam_search.py --beam-widths 4 8 --out /tmp/out
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from report import emit  # noqa: E402
from workloads import add_beam_workload_args, beam_workload  # noqa: E402

from jaxpaged import LLM, BeamSearchParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_beam_workload_args(parser)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    start = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization)
    startup = time.perf_counter() - start
    engine = llm.llm_engine
    prompts = [{"prompt_token_ids": p} for p in beam_workload(
        args.num_prompts, args.prompt_len, engine.model_config.vocab_size)]
    runs = []
    for width in args.beam_widths:
        params = BeamSearchParams(beam_width=width, max_tokens=args.max_tokens, ignore_eos=True)
        llm.beam_search(prompts[:2], BeamSearchParams(width, 4, ignore_eos=True))  # warm
        steps_before = engine.runner.timings.steps
        start = time.perf_counter()
        outputs = llm.beam_search(prompts, params)
        elapsed = time.perf_counter() - start
        output_tokens = sum(len(s.tokens) - args.prompt_len
                            for o in outputs for s in o.sequences)
        runs.append({"beam_width": width, "seconds": elapsed, "output_tokens": output_tokens,
                     "output_tok_s": output_tokens / elapsed,
                     "steps": engine.runner.timings.steps - steps_before,
                     "best_cum_logprob_0": outputs[0].sequences[0].cum_logprob})
        manager = engine.scheduler.block_manager
        if manager.num_free_blocks != manager.num_blocks - 1:
            raise RuntimeError("KV blocks still held after the beam search")
    emit({"device": jax.devices()[0].device_kind, "engine": "jaxpaged",
          "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
          "max_tokens": args.max_tokens, "startup_s": startup,
          "preemptions": engine.scheduler.num_preemptions, "runs": runs},
         args.out, "beam-search.json")


if __name__ == "__main__":
    main()
