"""Hugging Face transformers beam search on the same GPU: the baseline of bench/beam_search.py.

``model.generate(num_beams=k, num_return_sequences=k, do_sample=False, length_penalty=1.0,
early_stopping=False)`` on the same random-token prompts, in batches of ``--batch-size`` prompts
(left-padded is not needed: every prompt has ``--prompt-len`` tokens), EOS disabled and
``min_new_tokens = max_new_tokens`` so every beam runs ``--max-tokens`` steps; output_tok_s counts
the returned beams' tokens (num_prompts x k x max_tokens per second), as bench/beam_search.py
does. Random bf16 weights of the config's shapes on the device.

    python bench/hf_beam_baseline.py --beam-widths 4 8 --out /tmp/out
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

# bench/kernels.py must not shadow the `kernels` package that transformers probes for.
BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR))
from report import emit  # noqa: E402
from workloads import add_beam_workload_args, beam_workload  # noqa: E402
sys.path.remove(str(BENCH_DIR))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: E402

PAD_ID = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_beam_workload_args(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=240.0,
                        help="start no batch after this many seconds of a width's run")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    config = AutoConfig.from_pretrained(args.model)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    prompts = beam_workload(args.num_prompts, args.prompt_len, config.vocab_size)
    runs = []
    for width in args.beam_widths:
        generation = GenerationConfig(
            num_beams=width, num_return_sequences=width, do_sample=False, length_penalty=1.0,
            early_stopping=False, max_new_tokens=args.max_tokens,
            min_new_tokens=args.max_tokens, eos_token_id=None, pad_token_id=PAD_ID)

        def generate(batch: list[list[int]]) -> int:
            input_ids = torch.tensor(batch, device="cuda")
            with torch.no_grad():
                out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                     generation_config=generation)
            return (out.shape[1] - args.prompt_len) * out.shape[0]

        generate(prompts[:1])  # warm
        torch.cuda.synchronize()
        start, tokens, done = time.perf_counter(), 0, 0
        for i in range(0, len(prompts), args.batch_size):
            if time.perf_counter() - start > args.time_limit:
                break
            tokens += generate(prompts[i:i + args.batch_size])
            done = min(len(prompts), i + args.batch_size)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        runs.append({"beam_width": width, "seconds": elapsed, "output_tokens": tokens,
                     "completed_prompts": done, "output_tok_s": tokens / elapsed})
    emit({"device": torch.cuda.get_device_name(), "engine": "hf", "transformers":
          transformers.__version__, "num_prompts": args.num_prompts,
          "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
          "batch_size": args.batch_size, "runs": runs}, args.out, "hf-beam-search.json")


if __name__ == "__main__":
    main()
