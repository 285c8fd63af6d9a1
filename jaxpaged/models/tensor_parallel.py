"""Tensor parallelism over the devices of one host: a ``jax.sharding.Mesh`` with one axis, "tp".

The model is sharded Megatron-style and JAX's SPMD partitioner inserts the communication (NCCL on
GPUs): the fused QKV projection and gate/up are column-parallel (split by KV head groups and by
MLP columns), O and down are row-parallel (one all-reduce each per layer), the embedding and
lm_head are split by vocabulary, norms are replicated (``jaxpaged.models.sharding`` holds the
rules). Attention runs per shard under ``shard_map`` on its own heads (``models.attention``), and
the KV pool is split over KV heads: every device holds its heads' pages of every block id, so the
host's block manager, scheduler and block tables stay as they are.

KV head replication (vLLM's rule): with fewer KV heads than devices, each KV head is copied to
``size // num_kv_heads`` devices and each copy serves a slice of its query group. The sharded
model then runs ``sharded_config`` — the same model written with ``size`` KV heads of
``num_heads // size`` queries each (``replicate_kv_heads`` rewrites the QKV weights to it at load
time), whose query heads keep their order, so O needs no change.

A single device uses no mesh at all: ``create(1)`` is None and the program is the unsharded one.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpaged.models.config import ModelConfig

TP_AXIS = "tp"


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """The mesh one model is sharded over (two or more devices)."""

    mesh: Mesh

    @classmethod
    def create(cls, size: int, devices: list[jax.Device] | None = None
               ) -> "TensorParallel | None":
        """A mesh over the first ``size`` local devices (those CUDA_VISIBLE_DEVICES shows, on a
        GPU); None for ``size == 1``."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
        if size == 1:
            return None
        devices = list(jax.local_devices() if devices is None else devices)
        if size > len(devices):
            raise ValueError(f"tensor_parallel_size={size} needs {size} devices, this host has "
                             f"{len(devices)} ({devices[0].platform})")
        return cls(Mesh(np.array(devices[:size]), (TP_AXIS,)))

    @property
    def size(self) -> int:
        return self.mesh.devices.size

    def sharding(self, *spec: str | None) -> NamedSharding:
        """A NamedSharding over the mesh: ``sharding(None, "tp")`` splits axis 1."""
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding()

    def check(self, cfg: ModelConfig) -> None:
        """ValueError naming both numbers when the model cannot be split over ``size`` devices."""
        n = self.size
        if cfg.num_heads % n:
            raise ValueError(f"num_attention_heads={cfg.num_heads} is not divisible by "
                             f"tensor_parallel_size={n}")
        if cfg.num_kv_heads >= n and cfg.num_kv_heads % n:
            raise ValueError(f"num_key_value_heads={cfg.num_kv_heads} is not divisible by "
                             f"tensor_parallel_size={n}")
        if cfg.num_kv_heads < n and n % cfg.num_kv_heads:
            raise ValueError(f"tensor_parallel_size={n} is not a multiple of "
                             f"num_key_value_heads={cfg.num_kv_heads} (each device must hold "
                             "whole KV heads)")
        if cfg.intermediate_size % n:
            raise ValueError(f"intermediate_size={cfg.intermediate_size} is not divisible by "
                             f"tensor_parallel_size={n}")

    def kv_replicas(self, cfg: ModelConfig) -> int:
        """How many devices hold a copy of each KV head (1: the heads are split, not copied)."""
        self.check(cfg)
        return max(self.size // cfg.num_kv_heads, 1)

    def sharded_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config the sharded model runs: KV heads replicated up to ``size`` (module doc)."""
        return dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * self.kv_replicas(cfg))

    def kv_heads_per_device(self, cfg: ModelConfig) -> int:
        return self.sharded_config(cfg).num_kv_heads // self.size


def replicate_kv_heads(qkv, replicas: int):
    """QKV weight or bias ``[..., Hkv, G + 2, D]`` -> ``[..., Hkv * r, G / r + 2, D]``: each KV
    head's K and V copied ``r`` times, copy ``i`` with query heads ``i * G / r .. (i + 1) * G / r``
    of the group. Query heads keep their order (h = kv * G + g = copy * (G / r) + g'). numpy or
    jax arrays; ``replicas == 1`` returns ``qkv`` itself."""
    if replicas == 1:
        return qkv
    xp = np if isinstance(qkv, np.ndarray) else jax.numpy
    *lead, hkv, g2, d = qkv.shape
    g = g2 - 2
    if g % replicas:
        raise ValueError(f"{g} query heads per KV head cannot be split into {replicas} copies")
    queries = qkv[..., :g, :].reshape(*lead, hkv, replicas, g // replicas, d)
    kv = xp.broadcast_to(qkv[..., None, g:, :], (*lead, hkv, replicas, 2, d))
    out = xp.concatenate([queries, kv], axis=-2)  # [..., Hkv, r, G / r + 2, D]
    return out.reshape(*lead, hkv * replicas, g // replicas + 2, d)
