"""Prefill (BENCHMARKS.md "prefill"): time to first token for 1 x 2048 and 16 x 512 prompt tokens,
and the model FLOP utilization (MFU) of that step.

    python bench/prefill.py --model bench/configs/llama3-8b --out OUT [--trace]

Each case submits its prompts at once (they fit one step's token budget), runs engine steps until
every request has its first token, and reports the wall time (best of ``--repeats``; the first
round also warms up). MFU = (matmul FLOPs of every prompt token + causal attention FLOPs) /
time / F, with F the bf16 matmul rate measured in the same run (``roofline``). ``--trace`` writes
the device's kernels of one more round (``prefill_kernels_BxL.txt``, see ``gpu_trace``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpu_trace import with_kernel_table  # noqa: E402
from report import emit  # noqa: E402
from roofline import attention_flops, matmul_flops_per_token, measure_ceilings  # noqa: E402

from jaxpaged import LLM, SamplingParams  # noqa: E402

CASES = ((1, 2048), (16, 512))


def first_tokens(llm: LLM, batch: int, length: int, round_index: int) -> float:
    """Seconds from submitting ``batch`` prompts of ``length`` tokens to the last first token."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    rng = np.random.default_rng(round_index)
    ids = [f"p{round_index}-{i}" for i in range(batch)]
    start = time.perf_counter()
    for request_id in ids:
        engine.add_request(request_id, None, params,
                           prompt_token_ids=rng.integers(10, 10000, length).tolist())
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    ceilings = measure_ceilings()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096,
              max_num_batched_tokens=8192, enable_prefix_caching=False)
    cfg = llm.llm_engine.model_config
    rows = []
    for batch, length in CASES:
        best = min(first_tokens(llm, batch, length, r) for r in range(args.repeats + 1))
        context = np.tile(np.arange(1, length + 1), batch)  # causal: token i sees i tokens
        flops = batch * length * matmul_flops_per_token(cfg) + attention_flops(cfg, context)
        row = {"batch": batch, "prompt_len": length, "ttft_ms": best * 1e3,
               "tflops": flops / best / 1e12, "mfu": flops / best / ceilings.matmul_flops}
        rows.append(row)
        print(row, flush=True)
        if args.trace and args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"prefill_kernels_{batch}x{length}.txt").write_text(with_kernel_table(
                lambda: first_tokens(llm, batch, length, 99), steps=1))
    emit({"device": jax.devices()[0].device_kind,
          "matmul_TFLOPps": ceilings.matmul_flops / 1e12, "rows": rows}, args.out, "prefill.json")


if __name__ == "__main__":
    main()
