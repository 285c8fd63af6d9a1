"""vLLM's offline throughput on bench/throughput.py's workloads, for the same GPU call.

    python bench/vllm_baseline.py --model bench/configs/llama3-8b --workload nano --out OUT

Runs vLLM (0.24.0, from the kit that bench/vllm_kit.sh builds and `bench/gpu_check.sh vllm-nano`
installs) as throughput.py runs jaxpaged: random ("dummy") bf16 weights of the config's shapes,
no tokenizer (token-id prompts, no detokenization), the same prompts, output lengths and
temperature (bench/workloads.py), EOS ignored, the same engine limits (max_model_len 4096, 256
sequences, 8192 batched tokens, 90% of the GPU's memory), one small warm-up generate, then the
timed one. vLLM keeps its defaults otherwise (torch.compile, CUDA graphs, prefix caching,
chunked prefill, async scheduling); attention is pinned to FlashAttention 3, vLLM's default on
Hopper, so that a kit that cannot load it fails instead of measuring another backend.

Writes ``vllm-WORKLOAD.json`` with throughput.py's field names where they mean the same thing
(``output_tok_s``, ``total_tok_s``, ``seconds``, ``startup_s``: the ``LLM(...)`` constructor), plus
``startup_from_process_s``: from the process's start (Python and vLLM imports included) to the
engine's readiness.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

# Keep bench/ off sys.path except to import the helpers: bench/kernels.py would shadow the
# `kernels` package that transformers probes for.
BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR))
from workloads import (BenchRequests, add_throughput_run_args,  # noqa: E402
                       throughput_requests)
from report import emit  # noqa: E402
sys.path.remove(str(BENCH_DIR))

# Set before vLLM is imported; its engine-core process inherits them. The kit has no FlashInfer:
# vLLM's sampler would otherwise import FlashInfer's attention backend to probe for it.
VLLM_ENV = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def write_model_dir(config_dir: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """A model folder for vLLM's ``LLM(model=...)``: our bench config's config.json, with the
    weights' dtype under transformers 5's key (``dtype``; ours says ``torch_dtype``)."""
    config = json.loads((config_dir / "config.json").read_text())
    if "architectures" not in config:
        raise ValueError(f"{config_dir / 'config.json'} names no architectures")
    dtype = config.pop("torch_dtype", None)
    config.setdefault("dtype", dtype or "bfloat16")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def sampling_kwargs(requests: BenchRequests) -> list[dict]:
    """vLLM SamplingParams arguments of each request: throughput.py's, without detokenization."""
    return [{"temperature": requests.temperature, "ignore_eos": True, "max_tokens": n,
             "detokenize": False} for n in requests.output_lens]


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def run(args: argparse.Namespace, requests: BenchRequests, model_dir: pathlib.Path) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16", max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              attention_config={"backend": "FLASH_ATTN", "flash_attn_version": 3})
    startup = time.perf_counter() - start
    startup_from_process = seconds_since_process_start()
    prompts = [TokensPrompt(prompt_token_ids=p) for p in requests.prompts]
    params = [SamplingParams(**kwargs) for kwargs in sampling_kwargs(requests)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False),
                 use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    if output_tokens != sum(requests.output_lens):
        raise RuntimeError(f"vLLM generated {output_tokens} tokens, the workload asks for "
                           f"{sum(requests.output_lens)}")
    prompt_tokens = sum(len(p) for p in requests.prompts)
    cache = llm.llm_engine.vllm_config.cache_config
    return {
        "engine": "vllm", "vllm_version": vllm.__version__, "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(), "workload": args.workload,
        "num_requests": len(prompts), "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens, "seconds": elapsed,
        "output_tok_s": output_tokens / elapsed,
        "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
        "startup_s": startup, "startup_from_process_s": startup_from_process,
        "kv_capacity_tokens": (cache.num_gpu_blocks * cache.block_size
                               if cache.num_gpu_blocks else None),
        "enforce_eager": args.enforce_eager, "attention": "FLASH_ATTN v3",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=pathlib.Path,
                        default=pathlib.Path("bench/configs/llama3-8b"),
                        help="a folder with our config.json (bench/configs/...)")
    add_throughput_run_args(parser)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no torch.compile, no CUDA graphs (vLLM's flag)")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    os.environ.update(VLLM_ENV)
    requests = throughput_requests(args.workload, args.num_requests)
    with tempfile.TemporaryDirectory(prefix="vllm-model-") as tmp:
        model_dir = write_model_dir(args.model, pathlib.Path(tmp))
        result = run(args, requests, model_dir)
    emit(result, args.out, f"vllm-{args.workload}.json")


if __name__ == "__main__":
    main()
