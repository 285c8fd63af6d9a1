"""One process of the two-process tensor-parallel step (``test_multihost.py`` starts two):
``python multihost_testing.py COORDINATOR NUM_PROCESSES PROCESS_ID MODEL_DIR OUT``.

Each process has one CPU device; together they form a "tp" mesh of two over gloo. The leader
(process 0) holds the prompt; its step inputs reach the follower by ``share_step_inputs``; both
run the model's prefill step on their shards, and the leader saves the gathered logits to OUT.
"""

from __future__ import annotations

import sys

import numpy as np

PROMPT = [1, 15, 27, 3, 99, 4, 8, 42, 7, 16, 2, 5, 11, 63, 21, 9, 30, 12]  # 18 tokens: 2 blocks
BLOCK_SIZE = 16


def step_inputs(prompt: list[int]) -> dict[str, np.ndarray]:
    """A prefill step of one sequence over consecutive blocks 1.. (block 0 is the null block)."""
    n = len(prompt)
    num_blocks = -(-n // BLOCK_SIZE)
    return {"token_ids": np.asarray(prompt, np.int32),  # i32[T]
            "positions": np.arange(n, dtype=np.int32),  # i32[T]
            "block_table": np.arange(1, num_blocks + 1, dtype=np.int32)[None, :],  # i32[1, B]
            "seq_len": np.asarray(n, np.int32)}  # i32[]


def main(coordinator: str, num_processes: int, process_id: int, model_dir: str, out: str) -> None:
    from jaxpaged.distributed import multihost

    multihost.initialize(coordinator, num_processes, process_id, cpu_collectives="gloo")
    import jax
    from flax import nnx

    from jaxpaged.models.kv_cache import KVCache
    from jaxpaged.models.loader import load_model
    from jaxpaged.models.sharding import kv_cache_shardings
    from model_testing import _forward

    tp = multihost.global_tensor_parallel()
    model = load_model(model_dir, dtype="fp32", attn_impl="reference", tensor_parallel=tp)
    cfg = model.config  # the sharded config (KV heads replicated up to the mesh size)
    mine = step_inputs(PROMPT if multihost.is_leader() else [0] * len(PROMPT))
    shared = multihost.share_step_inputs(mine, tp.mesh)
    kv = KVCache.zeros(num_layers=cfg.num_layers, num_blocks=8, block_size=BLOCK_SIZE,
                       num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       dtype=jax.numpy.float32, **kv_cache_shardings(tp.mesh))
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        logits, _ = _forward(graphdef, state, kv, shared["token_ids"], shared["positions"],
                             shared["block_table"], shared["seq_len"], BLOCK_SIZE)
    whole = multihost.gather_to_host(logits)  # f32[T, vocab]
    if multihost.is_leader():
        np.save(out, whole)
    print(f"process {process_id}: {len(jax.local_devices())} of {len(jax.devices())} devices, "
          f"logits {whole.shape}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
