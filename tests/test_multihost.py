"""Tensor parallel across processes (``jaxpaged.distributed.multihost``): two processes on
localhost, one CPU device each, join through ``jax.distributed.initialize``, run one sharded
prefill step of the tiny model together over gloo, and agree with the one-process result."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.loader import load_model
from model_testing import _forward
from multihost_testing import BLOCK_SIZE, PROMPT, step_inputs

TESTS = pathlib.Path(__file__).resolve().parent
NAME = "llama-gqa"  # 2 KV heads: one per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_logits(model_dir) -> np.ndarray:
    model = load_model(model_dir, dtype="fp32", attn_impl="reference")
    cfg = model.config
    inputs = step_inputs(PROMPT)
    kv = KVCache.zeros(num_layers=cfg.num_layers, num_blocks=8, block_size=BLOCK_SIZE,
                       num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       dtype=jax.numpy.float32)
    graphdef, state = nnx.split(model)
    logits, _ = _forward(graphdef, state, kv, inputs["token_ids"], inputs["positions"],
                         inputs["block_table"], inputs["seq_len"], BLOCK_SIZE)
    return np.asarray(logits)


@pytest.mark.slow
def test_two_processes_run_one_sharded_step_and_agree_with_one(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint(NAME)
    out = tmp_path / "logits.npy"
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
               p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)}
    processes = [subprocess.Popen([sys.executable, str(TESTS / "multihost_testing.py"),
                                   coordinator, "2", str(i), str(model_dir), str(out)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for i in range(2)]
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=240)[0])
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(logs)
    assert "process 0: 1 of 2 devices" in logs[0] and "process 1: 1 of 2 devices" in logs[1]
    sharded = np.load(out)
    expected = one_process_logits(model_dir)
    assert sharded.shape == expected.shape == (len(PROMPT), expected.shape[1])
    assert np.linalg.norm(sharded - expected) / np.linalg.norm(expected) < 1e-5
    assert (sharded.argmax(-1) == expected.argmax(-1)).all()
