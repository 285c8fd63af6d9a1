"""Hugging Face transformers baseline on the same GPU (BENCHMARKS.md "Baselines").

Static batching with ``model.generate`` (vLLM's ``--backend hf`` protocol): requests in groups of up
to 64, left-padded; every sequence of a group generates the group's longest output length
(``min_new_tokens`` = ``max_new_tokens``, EOS disabled), and throughput counts the requested output
tokens, as nano does. Random bf16 weights of the config's shapes are initialized on the GPU.

    python bench/hf_baseline.py --model bench/configs/llama3-8b --workload nano --num-requests 64
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from workloads import fixed_workload, nano_workload  # noqa: E402
from report import emit  # noqa: E402


def load_random_model(model_dir: str):
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def run_static(model, prompts: list[list[int]], outputs: list[int], group: int,
               temperature: float) -> float:
    pad = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), group):
        batch, lens = prompts[first:first + group], outputs[first:first + group]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        n = max(lens)
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                  pad_token_id=pad, do_sample=temperature > 0,
                                  temperature=temperature or None, top_k=None, top_p=None)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--workload", choices=["nano", "fixed"], default="nano")
    parser.add_argument("--num-requests", type=int)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    if args.workload == "nano":
        prompts, outputs = nano_workload()
        temperature = 0.6
    else:
        prompts, outputs = fixed_workload()
        temperature = 0.0
    count = args.num_requests or len(prompts)
    prompts, outputs = prompts[:count], outputs[:count]
    model = load_random_model(args.model)
    run_static(model, prompts[:2], [4, 4], args.group, temperature)  # warm-up
    seconds = run_static(model, prompts, outputs, args.group, temperature)
    result = {"device": torch.cuda.get_device_name(), "baseline": "hf static generate",
              "workload": args.workload, "num_requests": count, "group": args.group,
              "output_tokens": sum(outputs), "seconds": seconds,
              "output_tok_s": sum(outputs) / seconds,
              "torch": torch.__version__}
    emit(result, args.out, f"hf-{args.workload}.json")


if __name__ == "__main__":
    main()
