"""Prometheus metrics of one server, with vLLM's metric names where vLLM has one.

Every metric lives in the server's own ``CollectorRegistry`` (no process-global state), so two
servers in one process, as in the tests, count separately. All metrics carry vLLM's
``model_name`` label. Only the engine thread feeds them (``observe_step``, ``observe_output``,
``observe_abort``, ``observe_failure``); scrapes read them from the event loop (prometheus_client
is thread-safe).

Latencies are measured from the moment the HTTP handler accepted the request (``arrival_time``),
so they include the wait for the engine thread.
"""

from __future__ import annotations

import dataclasses
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

from jaxpaged.outputs import RequestOutput
from jaxpaged.core.scheduler_output import SchedulerStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bucket edges in seconds.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                      0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0)


@dataclasses.dataclass
class _InFlight:
    """What the metrics remember about one running request."""

    arrival_time: float
    first_token_time: float | None = None
    last_output_time: float | None = None
    tokens_per_sequence: dict[int, int] = dataclasses.field(default_factory=dict)


class ServerMetrics:
    """The server's metrics; the attributes are the ``model_name``-labelled series."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self._model_name = model_name
        self._in_flight: dict[str, _InFlight] = {}
        self._last_stats: SchedulerStats | None = None
        self.num_requests_running = self._series(
            Gauge, "vllm:num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = self._series(
            Gauge, "vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = self._series(
            Gauge, "vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).")
        self.prompt_tokens = self._series(Counter, "vllm:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = self._series(
            Counter, "vllm:generation_tokens", "Generated tokens.")
        self.num_preemptions = self._series(
            Counter, "vllm:num_preemptions", "Preemptions (by recompute).")
        self.prefix_cache_queries = self._series(
            Counter, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = self._series(
            Counter, "vllm:prefix_cache_hits", "Prompt tokens served by the prefix cache.")
        self.request_aborted = self._series(
            Counter, "jaxpaged:request_aborted", "Requests aborted (client gone or shutdown).")
        self.request_failed = self._series(
            Counter, "jaxpaged:request_failed", "Requests failed by an engine error (HTTP 500).")
        self.time_to_first_token = self._series(
            Histogram, "vllm:time_to_first_token_seconds", "Time to first token.",
            buckets=_TTFT_BUCKETS)
        self.inter_token_latency = self._series(
            Histogram, "vllm:inter_token_latency_seconds",
            "Time between consecutive outputs of a request.", buckets=_TOKEN_GAP_BUCKETS)
        self.time_per_output_token = self._series(
            Histogram, "vllm:time_per_output_token_seconds",
            "Per request: (last token time - first token time) / (output tokens - 1).",
            buckets=_TOKEN_GAP_BUCKETS)
        self.e2e_request_latency = self._series(
            Histogram, "vllm:e2e_request_latency_seconds", "End-to-end request latency.",
            buckets=_REQUEST_BUCKETS)
        success = Counter("vllm:request_success", "Requests that finished.",
                          ["model_name", "finished_reason"], registry=self.registry)
        self.request_success = {reason: success.labels(model_name, reason)
                                for reason in ("stop", "length", "abort")}

    def _series(self, kind, name: str, documentation: str, **kwargs):
        """A metric with the ``model_name`` label, created at 0 so a fresh server shows it."""
        family = kind(name, documentation, ["model_name"], registry=self.registry, **kwargs)
        return family.labels(self._model_name)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    # ----- fed by the engine thread -----

    def observe_admission(self, request_id: str, arrival_time: float) -> None:
        self._in_flight[request_id] = _InFlight(arrival_time)

    def observe_step(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        last = self._last_stats
        for counter, field in ((self.num_preemptions, "num_preemptions"),
                               (self.prefix_cache_queries, "prefix_cache_queries"),
                               (self.prefix_cache_hits, "prefix_cache_hits")):
            delta = getattr(stats, field) - (getattr(last, field) if last else 0)
            if delta > 0:
                counter.inc(delta)
        self._last_stats = stats

    def observe_output(self, output: RequestOutput, now: float | None = None) -> None:
        """One DELTA output of a request: token counts, TTFT, inter-token latency, and at the
        end e2e latency, TPOT and the finish reason."""
        flight = self._in_flight.get(output.request_id)
        if flight is None:
            return
        now = time.time() if now is None else now
        if flight.first_token_time is None:
            flight.first_token_time = now
            self.time_to_first_token.observe(now - flight.arrival_time)
            self.prompt_tokens.inc(len(output.prompt_token_ids or ()))
        else:
            self.inter_token_latency.observe(now - flight.last_output_time)
        flight.last_output_time = now
        new_tokens = 0
        for seq in output.outputs:
            counts = flight.tokens_per_sequence
            counts[seq.index] = counts.get(seq.index, 0) + len(seq.token_ids)
            new_tokens += len(seq.token_ids)
        self.generation_tokens.inc(new_tokens)
        if output.finished:
            self._observe_finish(output, flight, now)

    def _observe_finish(self, output: RequestOutput, flight: _InFlight, now: float) -> None:
        del self._in_flight[output.request_id]
        self.e2e_request_latency.observe(now - flight.arrival_time)
        longest = max(flight.tokens_per_sequence.values(), default=0)
        if longest > 1:
            self.time_per_output_token.observe((now - flight.first_token_time) / (longest - 1))
        reason = next((s.finish_reason for s in reversed(output.outputs) if s.finish_reason),
                      "stop")
        self.request_success.get(reason, self.request_success["stop"]).inc()

    def observe_abort(self, request_id: str) -> None:
        if self._in_flight.pop(request_id, None) is not None:
            self.request_aborted.inc()

    def observe_failure(self, request_id: str) -> None:
        if self._in_flight.pop(request_id, None) is not None:
            self.request_failed.inc()
