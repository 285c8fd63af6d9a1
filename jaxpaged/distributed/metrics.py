"""/metrics behind replicas: every replica's Prometheus metrics, each sample with a ``replica``
label, and the front end's own (requests routed, restarts) in one exposition."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class FrontEndMetrics:
    """The router's view, per replica."""

    def __init__(self, model_name: str, num_replicas: int):
        self.registry = CollectorRegistry(auto_describe=True)
        routed = Counter("jaxpaged:replica_requests_routed",
                         "HTTP requests sent to each replica (retries included).",
                         ["model_name", "replica"], registry=self.registry)
        restarts = Counter("jaxpaged:replica_restarts", "Times each replica was restarted.",
                           ["model_name", "replica"], registry=self.registry)
        retried = Counter("jaxpaged:replica_requests_retried",
                          "Requests sent again to another replica after theirs died before "
                          "streaming anything.", ["model_name"], registry=self.registry)
        self.routed = [routed.labels(model_name, str(i)) for i in range(num_replicas)]
        self.restarts = [restarts.labels(model_name, str(i)) for i in range(num_replicas)]
        self.retried = retried.labels(model_name)


class _Families:
    """A collector that yields ready-made families."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_replica_metrics(texts: Sequence[tuple[int, bytes]],
                          front_end: CollectorRegistry) -> bytes:
    """``texts``: (replica, its exposition) for each replica that answered."""
    families: dict[str, Metric] = {}
    for replica, text in texts:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            merged.samples.extend(
                Sample(s.name, {**s.labels, "replica": str(replica)}, s.value, s.timestamp,
                       s.exemplar) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(front_end) + generate_latest(registry)
