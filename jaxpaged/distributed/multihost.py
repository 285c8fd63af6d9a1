"""One model over the devices of several hosts (tensor parallel across hosts) with
``jax.distributed``: the mechanism, and the design of the engine built on it.

Design
------
*How processes start.* One jaxpaged process per host, each started the same way (by hand, a
job scheduler, or one Ray actor per host) with the same model, the same engine arguments and
three more: the coordinator's address (host 0's ``host:port``), the number of processes and its
own index. Each calls ``initialize`` first, before anything touches a device: JAX then sees every
host's devices as one global device list (``jax.devices()``), of which its own are
``jax.local_devices()``. On GPUs NCCL carries the collectives; on CPUs gloo does
(``initialize(..., cpu_collectives="gloo")``, the tests).

*The model.* ``global_tensor_parallel()`` is the usual "tp" mesh, over the global device list;
the model, its sharding rules and the KV pool (split over KV heads) are unchanged. Every process
loads only its own shards (``jax.make_array_from_callback`` asks each process for the slices of
its devices) and allocates its part of every KV block.

*Who owns the scheduler.* Process 0, the leader, alone runs the HTTP server (or ``LLM``), the
scheduler, the block manager and the detokenizer: one source of truth for which request holds
which blocks. The other processes are followers with no scheduler and no requests; their pools
mirror the leader's block ids because every step writes the same slots on every host.

*How step inputs reach the other hosts.* SPMD needs every process to run the same compiled
program on the same inputs, step for step. The leader prepares a step (``StepInputs``: token
ids, positions, slot mapping, block tables, sampling tensors: small host arrays) and
``share_step_inputs`` broadcasts them from process 0 to all (``multihost_utils.
broadcast_one_to_all``: a collective over the same NCCL/gloo links, shapes fixed by the step's
bucket, which the followers learn from a tiny header broadcast first); every process then calls
the jitted step with them, as replicated global arrays. The sampled ids come back replicated, so
the leader reads them from its own devices; followers drop them. A stop is one more broadcast
(an empty header). Followers therefore loop: receive header, receive inputs, step.

Built here: ``initialize``, ``global_tensor_parallel``, ``share_step_inputs`` and
``gather_to_host``; ``tests/test_multihost.py`` runs one sharded step of the tiny model in two
processes (gloo) and compares it with the one-process result. Not built yet: the follower loop
in the engine (``LLMEngine`` still runs on one host).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpaged.models.tensor_parallel import TP_AXIS, TensorParallel


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               cpu_collectives: str | None = None) -> None:
    """Join the job (before any device is used). ``cpu_collectives="gloo"`` lets CPU devices
    of different processes run collectives (GPUs use NCCL without it)."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def global_tensor_parallel(size: int | None = None) -> TensorParallel:
    """The "tp" mesh over the first ``size`` devices of every host together (default: all)."""
    devices = jax.devices()
    size = len(devices) if size is None else size
    if not 1 < size <= len(devices):
        raise ValueError(f"a multi-host mesh needs 2 to {len(devices)} devices, got {size}")
    return TensorParallel(Mesh(np.array(devices[:size]), (TP_AXIS,)))


def is_leader() -> bool:
    return jax.process_index() == 0


def share_step_inputs(inputs: Any, mesh: Mesh) -> Any:
    """The leader's step inputs (a pytree of host arrays) on every process, as global arrays
    replicated over ``mesh``. Followers pass a pytree of the same shapes and dtypes (its
    values are ignored)."""
    shared = multihost_utils.broadcast_one_to_all(inputs, is_source=is_leader())
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(replicated,
                                                                         np.asarray(x)), shared)


def gather_to_host(array: jax.Array) -> np.ndarray:
    """A global array, whole, on every process's host (e.g. logits split over vocabulary)."""
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
