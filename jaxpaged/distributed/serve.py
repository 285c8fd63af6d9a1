"""``jaxpaged serve --data-parallel-size N``: N engine replicas on Ray behind one front end.

The front end process joins Ray (``ray.init()`` starts a local cluster; ``--ray-address``
joins an existing one), starts the replicas (each a Ray actor owning ``tensor_parallel_size``
GPUs when the cluster has GPUs, else CPU), waits until every one is ready, and serves the usual
Starlette app over a ``ReplicaEngine``. Each replica loads the model itself, so the model
directory must be readable at the same path on every node of the cluster.
"""

from __future__ import annotations

import logging
from typing import Any

from jaxpaged.config import EngineConfig
from jaxpaged.server.settings import ServerSettings

from jaxpaged.distributed.metrics import FrontEndMetrics
from jaxpaged.distributed.options import ReplicaOptions
from jaxpaged.distributed.ray_import import import_ray
from jaxpaged.distributed.replica import EngineReplica
from jaxpaged.distributed.replica_engine import ReplicaEngine
from jaxpaged.distributed.router import Router
from jaxpaged.distributed.supervisor import ReplicaSupervisor

logger = logging.getLogger(__name__)


def replica_resources(tensor_parallel_size: int, cluster_gpus: float) -> dict[str, Any]:
    """A replica's Ray resources: its ``tensor_parallel_size`` GPUs, or one CPU on a cluster
    without GPUs (the CPU tests; logged, never silent)."""
    if cluster_gpus > 0:
        return {"num_gpus": tensor_parallel_size}
    logger.warning("the Ray cluster has no GPUs: the engine replicas run on CPU")
    return {"num_cpus": 1}


def build_replica_engine(ray, config: EngineConfig, settings: ServerSettings,
                         options: ReplicaOptions):
    """Start the replicas; returns (ReplicaEngine, EngineFacts) for ``build_app_for``."""
    resources = replica_resources(config.tensor_parallel_size,
                                  ray.cluster_resources().get("GPU", 0))
    actor = ray.remote(EngineReplica).options(max_restarts=0, max_concurrency=10_000,
                                              **resources)
    model_name = settings.served_model_names[0]

    def spawn(index: int):
        return actor.remote(config, model_name, index)

    supervisor = ReplicaSupervisor(ray, spawn, options.data_parallel_size,
                                   ping_interval_s=options.ping_interval_s)
    facts = supervisor.start_replicas()
    router = Router(options.data_parallel_size, facts.block_size,
                    slack_tokens=facts.max_model_len)
    engine = ReplicaEngine(ray, supervisor, router,
                           FrontEndMetrics(model_name, options.data_parallel_size),
                           facts.max_model_len)
    logger.info("%d engine replicas ready", options.data_parallel_size)
    return engine, facts


def init_ray(options: ReplicaOptions):
    """Join the cluster at ``options.ray_address``, or start a local one."""
    ray = import_ray("--data-parallel-size above 1")
    if not ray.is_initialized():
        ray.init(address=options.ray_address)
    return ray
