"""Step failures: how a failure names the requests it belongs to, and a documented injection point
for tests.

``LLMEngine(config, step_hook=hook)`` calls ``hook(scheduler_output)`` in every step after
scheduling and before the model step is dispatched, on the engine's own thread. A hook that
raises makes the step fail exactly as a failure in the runner would, so tests exercise the real
recovery path (``LLMEngine.recover``) without replacing any part of the engine.

A failure that belongs to some requests raises ``RequestFault`` naming them: recovery then fails
only those, and every other request of the step is recomputed (it loses nothing). Any other
exception fails the requests the step scheduled.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable

from jaxpaged.core.scheduler_output import SchedulerOutput

StepHook = Callable[[SchedulerOutput], None]


class RequestFault(RuntimeError):
    """A step failed because of these requests (ids as the step scheduled them)."""

    def __init__(self, request_ids: Iterable[str], message: str):
        super().__init__(message)
        self.request_ids = frozenset(request_ids)


@dataclasses.dataclass
class _Armed:
    prefix: str | None  # None: the next step, whatever it schedules
    attributed: bool


class FaultInjector:
    """A step hook for tests and the soak benchmark: faults armed from any thread fire once, in
    the next step that schedules a matching request.

    ``fail_request("cmpl-abc")``: a ``RequestFault`` naming the step's requests whose id starts
    with the prefix (the others beside them must not notice). ``fail_next_step()``: an
    unattributed ``RuntimeError`` in the next step that schedules anything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []
        self.fired = 0  # faults raised so far

    def fail_request(self, request_id_prefix: str) -> None:
        with self._lock:
            self._armed.append(_Armed(request_id_prefix, attributed=True))

    def fail_next_step(self) -> None:
        with self._lock:
            self._armed.append(_Armed(None, attributed=False))

    def __call__(self, scheduler_output: SchedulerOutput) -> None:
        ids = [s.req_id for s in scheduler_output.scheduled]
        with self._lock:
            for armed in self._armed:
                hit = [i for i in ids if armed.prefix is None or i.startswith(armed.prefix)]
                if hit:
                    self._armed.remove(armed)
                    self.fired += 1
                    break
            else:
                return
        if armed.attributed:
            raise RequestFault(hit, f"injected fault in request {hit[0]!r}")
        raise RuntimeError("injected step failure")
