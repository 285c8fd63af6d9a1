"""The physical floor of a workload on this GPU (BENCHMARKS.md, "The physical floor").

Measured in the same run: device-to-device copy bandwidth BW (>= 4 GiB, bytes read + written) and
the bf16 matmul rate F (8192^3). The floor of a workload is prefill FLOPs / F plus, for every
decode step of the ideal schedule that keeps all requests in flight, max(bytes / BW, FLOPs / F),
with bytes = weight bytes + the K/V bytes of every context read in that step.

    python bench/roofline.py --model bench/configs/llama3-8b     # prints BW, F and the nano floor
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from workloads import nano_workload  # noqa: E402
from report import emit  # noqa: E402

from jaxpaged.models.config import ModelConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Ceilings:
    bandwidth: float  # bytes / s, device-to-device copy (read + write)
    matmul_flops: float  # FLOP / s, bf16 8192^3


def _best_time(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def measure_bandwidth(copy_bytes: int = 4 << 30) -> float:
    """Device-to-device copy, bytes read + written per second: the best of an XLA elementwise
    update (f32 and bf16) and, where torch is installed, ``Tensor.copy_`` (the cudaMemcpy path)."""
    results = []
    try:
        import torch
        if torch.cuda.is_available():
            src = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            dst.copy_(src)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            best = float("inf")
            for _ in range(10):
                events[0].record()
                dst.copy_(src)
                events[1].record()
                torch.cuda.synchronize()
                best = min(best, events[0].elapsed_time(events[1]) / 1e3)
            results.append(2 * copy_bytes / best)
            print(f"copy bandwidth, torch copy_: {results[-1] / 1e12:.2f} TB/s", file=sys.stderr)
            del src, dst
            torch.cuda.empty_cache()
    except ImportError:
        pass
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.zeros((copy_bytes // jnp.dtype(dtype).itemsize,), dtype)
        step = jax.jit(lambda v: v + jnp.asarray(1, v.dtype), donate_argnums=0)
        x = step(x)  # compile; afterwards each call reads and writes copy_bytes in place
        times = []
        for _ in range(10):
            start = time.perf_counter()
            x = step(x)
            x.block_until_ready()
            times.append(time.perf_counter() - start)
        results.append(2 * copy_bytes / min(times))
        print(f"copy bandwidth, XLA {jnp.dtype(dtype).name} update: {results[-1] / 1e12:.2f} TB/s",
              file=sys.stderr)
        del x
    return max(results)


def measure_matmul_rate(size: int = 8192, matmuls_per_call: int = 8, warmup_s: float = 1.0,
                        repeats: int = 10) -> float:
    """bf16 ``size``^3 matmul FLOP/s: the best of ``repeats`` timed calls of one jit that runs
    ``matmuls_per_call`` independent matmuls (so host dispatch and sync are a small share), after
    ``warmup_s`` of the same work so that the GPU's clocks have left their idle state. (One
    matmul per timed call after none of warm-up measured 633-718 TFLOP/s on the same kind of H100
    from run to run: a floor from a low F is too easy.)"""
    keys = jax.random.split(jax.random.key(0), matmuls_per_call + 1)
    a = jax.random.normal(keys[0], (size, size), jnp.bfloat16)
    bs = [jax.random.normal(key, (size, size), jnp.bfloat16) for key in keys[1:]]
    products = jax.jit(lambda a, bs: [a @ b for b in bs])
    jax.block_until_ready(products(a, bs))
    started = time.perf_counter()
    while time.perf_counter() - started < warmup_s:
        jax.block_until_ready(products(a, bs))
    return matmuls_per_call * 2 * size**3 / _best_time(products, a, bs, repeats=repeats)


def measure_ceilings(copy_bytes: int = 4 << 30) -> Ceilings:
    return Ceilings(bandwidth=measure_bandwidth(copy_bytes), matmul_flops=measure_matmul_rate())


def weight_bytes(cfg: ModelConfig, itemsize: int = 2, quantization: str | None = None) -> int:
    """Bytes of the weights one decode step reads. ``quantization`` ("fp8" / "int8"): the
    projections at one byte per weight plus an f32 scale per output channel; norms and lm_head
    stay at ``itemsize`` (jaxpaged.models.linear)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    projections = h * qkv_out + cfg.num_heads * d * h + 3 * h * i  # per layer
    head = 0 if cfg.tie_word_embeddings else h * cfg.vocab_size
    # the embedding table is gathered (a few rows per step), not read whole
    rest = itemsize * (cfg.num_layers * 2 * h + h + head)
    if quantization is None:
        return itemsize * cfg.num_layers * projections + rest
    scales = 4 * (qkv_out + h + 2 * i + h)  # f32 per output channel, per layer
    return cfg.num_layers * (projections + scales) + rest


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    return 2 * (weight_bytes(cfg) // 2)


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int = 2) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def attention_flops(cfg: ModelConfig, context: np.ndarray) -> float:
    """FLOPs of QK^T and PV for one query token per entry of ``context``."""
    return float(4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * np.sum(context))


def workload_floor(cfg: ModelConfig, prompt_lens: list[int], output_lens: list[int],
                   ceilings: Ceilings, kv_itemsize: int = 2,
                   quantization: str | None = None) -> dict[str, float]:
    """Seconds of the ideal schedule: all prompts prefilled, then every request decodes each
    step until its output is done (the first output token comes from the prefill). K/V bytes at
    ``kv_itemsize`` per value (1 for an fp8 pool; its per-layer scales are negligible); weight
    bytes at their stored width for ``quantization`` (F stays the bf16 rate: the W8A16 kernels
    multiply in bf16; a W8A8 run should pass the fp8 rate in ``ceilings``)."""
    prompts, outputs = np.asarray(prompt_lens), np.asarray(output_lens)
    prefill_flops = matmul_flops_per_token(cfg) * prompts.sum() + sum(
        attention_flops(cfg, np.arange(p)) / 2 for p in prompts)
    prefill = prefill_flops / ceilings.matmul_flops
    weights = weight_bytes(cfg, quantization=quantization)
    decode = weight_time = kv_time = 0.0
    for step in range(1, int(outputs.max())):
        active = outputs > step
        context = prompts[active] + step
        step_bytes = weights + kv_bytes_per_token(cfg, kv_itemsize) * context.sum()
        step_flops = matmul_flops_per_token(cfg) * active.sum() + attention_flops(cfg, context)
        decode += max(step_bytes / ceilings.bandwidth, step_flops / ceilings.matmul_flops)
        weight_time += weights / ceilings.bandwidth
        kv_time += kv_bytes_per_token(cfg, kv_itemsize) * context.sum() / ceilings.bandwidth
    return {"floor_s": prefill + decode, "prefill_s": prefill, "decode_s": decode,
            "decode_weight_read_s": weight_time, "decode_kv_read_s": kv_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--quantization", choices=["fp8", "int8"], default=None,
                        help="weight bytes at the quantized width")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    cfg = ModelConfig.from_dir(args.model)
    ceilings = measure_ceilings()
    prompts, outputs = nano_workload()
    floor = workload_floor(cfg, [len(p) for p in prompts], outputs, ceilings,
                           quantization=args.quantization)
    result = {"device": jax.devices()[0].device_kind, "bandwidth_TBps": ceilings.bandwidth / 1e12,
              "matmul_TFLOPps": ceilings.matmul_flops / 1e12, "nano": floor,
              "nano_floor_output_tok_s": sum(outputs) / floor["floor_s"]}
    emit(result, args.out, "roofline.json")


if __name__ == "__main__":
    main()
