"""Beyond one engine: data-parallel engine replicas on Ray behind one OpenAI endpoint, and the
multi-host single-model mechanism (``multihost``).

``jaxpaged serve --data-parallel-size N`` (``serve.py``) starts N engine replicas as Ray actors
(``replica.py``), each owning ``tensor_parallel_size`` GPUs, behind the one Starlette front end:
``ReplicaEngine`` (``replica_engine.py``) stands in for the in-process engine thread at the
front end's one seam (``server/engine_client.py``). It routes each request with ``Router``
(``router.py``: fewest outstanding tokens, preferring the replica that holds the prompt's first
blocks), passes streams through, and retries a request on another replica when its replica died
before anything was streamed. ``ReplicaSupervisor`` (``supervisor.py``) watches the replicas and
restarts a dead one; ``metrics.py`` merges the replicas' Prometheus metrics under a ``replica``
label. Ray is an optional extra: ``pip install "jaxpaged[ray]"`` (``ray_import.py``).
"""
