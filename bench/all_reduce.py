"""Latency of the collectives a tensor-parallel step runs, at the step's own message sizes.

    python bench/all_reduce.py --model bench/configs/llama3-8b --sizes 2 4 8

Under ``tensor_parallel_size=N`` every layer all-reduces the O and down projections' partial sums
([T, hidden] in the model dtype, T the step's token bucket), the vocab-split embedding lookup adds
one more, and the sampler's logits are gathered once ([S, vocab] f32 from [S, vocab / N]). For
each N (up to the GPUs present) and each T / S this times those collectives alone, each inside a
jitted ``shard_map`` (what XLA emits for the model: NCCL on GPUs), and reports the median
microseconds and the bus bandwidth (all-reduce: 2 (N - 1) / N x bytes / time). ``per_step_ms``
estimates a step's communication: (2 x layers + 1) all-reduces + one logits gather.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpaged.models.config import ModelConfig

TOKENS = (1, 16, 64, 256, 1024, 8192)  # decode batches and prefill chunks
SEQS = (1, 16, 64, 256)


def time_call(fn, x, iters: int) -> float:
    """Median seconds of ``fn(x)`` (compiled once, warmed up)."""
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def all_reduce(mesh: Mesh, shape: tuple[int, ...], dtype) -> tuple:
    """A jitted psum of per-device partial sums of ``shape`` and its input."""
    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("tp"), out_specs=P())
    def reduce(x):  # x [1, *shape] per device: its partial sum
        return jax.lax.psum(x[0], "tp")
    n = mesh.devices.size
    x = jax.device_put(jnp.ones((n, *shape), dtype), NamedSharding(mesh, P("tp")))
    return reduce, x


def all_gather(mesh: Mesh, rows: int, vocab: int) -> tuple:
    """A jitted gather of vocab-split f32 logits [rows, vocab] to one copy on every device."""
    split = NamedSharding(mesh, P(None, "tp"))
    gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))
    return gather, jax.device_put(jnp.ones((rows, vocab), jnp.float32), split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    cfg = ModelConfig.from_dir(args.model)
    devices = jax.local_devices()
    vocab = cfg.vocab_size - cfg.vocab_size % max(args.sizes)  # divisible, as the model splits it
    rows = []
    for n in [s for s in args.sizes if s <= len(devices)]:
        mesh = Mesh(np.array(devices[:n]), ("tp",))
        reduce_s = {}
        for t in TOKENS:
            fn, x = all_reduce(mesh, (t, cfg.hidden_size), jnp.bfloat16)
            seconds = time_call(fn, x, args.iters)
            reduce_s[t] = seconds
            nbytes = t * cfg.hidden_size * 2
            rows.append(dict(op="all-reduce", tp=n, tokens=t, bytes=nbytes, us=seconds * 1e6,
                             bus_GBps=2 * (n - 1) / n * nbytes / seconds / 1e9))
            print(json.dumps(rows[-1]), flush=True)
        for s in SEQS:
            fn, x = all_gather(mesh, s, vocab)
            seconds = time_call(fn, x, args.iters)
            nbytes = s * vocab * 4
            rows.append(dict(op="all-gather-logits", tp=n, seqs=s, bytes=nbytes,
                             us=seconds * 1e6, bus_GBps=(n - 1) / n * nbytes / seconds / 1e9))
            rows[-1]["per_step_ms"] = {  # decode step of s sequences: its all-reduces + gather
                "decode": ((2 * cfg.num_layers + 1) * reduce_s.get(s, float("nan"))
                           + seconds) * 1e3}
            print(json.dumps(rows[-1]), flush=True)
    summary = {"device": devices[0].device_kind, "num_devices": len(devices),
               "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "all_reduce.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
