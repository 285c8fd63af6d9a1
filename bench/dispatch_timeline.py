"""When the host queues each step's programs, relative to when it learns the previous tokens.

``DispatchTimeline(engine)`` wraps the runner's model and sampler launches, its fetches and the
scheduler, and records their host timestamps. From them, per step k (its model launch):

- ``model_path_ms``: from the return of the fetch of step k - 2's tokens (the moment the device
  finished sampler k - 2 and started on what was queued behind it) to the launch of model k.
  Between those two moments the device runs only model k - 1 and sampler k - 1 (and whatever was
  already queued), so the device idles before model k exactly when this host time exceeds their
  device time. It is the host's critical path per step.
- ``mask_fill_ms_median``: the grammar bitmask fills (``StructuredOutputManager.bitmask``).
- ``sampler_gap_ms``: from the launch of sampler k - 1 to the launch of model k (the brief's
  "sampler dispatched -> next model dispatched" gap), and ``work_in_gap``: whether the scheduler
  ran in that gap (host work that does not need the device's tokens, on the critical path).

Async scheduling only (a synchronous step fetches its own tokens)."""

from __future__ import annotations

import dataclasses
import statistics
import time


@dataclasses.dataclass
class _Event:
    kind: str  # "model", "sampler", "fetched", "schedule"
    step: int  # the model launch this event belongs to (see DispatchTimeline)
    t: float


class DispatchTimeline:
    """Records the launch order of one engine. ``model`` events are numbered 0, 1, ...; a
    sampler belongs to the latest model launched before it; a fetch to its sampler."""

    def __init__(self, engine):
        self.events: list[_Event] = []
        runner, scheduler = engine.runner, engine.scheduler
        run_model, run_sampler, fetch = runner._run_model, runner._run_sampler, runner.fetch
        schedule = scheduler.schedule
        self._models = 0
        self._sampler_step: dict[int, int] = {}  # id(token ids array) -> its step

        def timed_model(*args, **kwargs):
            out = run_model(*args, **kwargs)
            self._record("model", self._models)
            self._models += 1
            return out

        def timed_sampler(*args, **kwargs):
            out, padded = run_sampler(*args, **kwargs)
            step = self._models - 1
            self._sampler_step[id(out.token_ids)] = step
            self._record("sampler", step)
            return out, padded

        def timed_fetch(handle):
            result = fetch(handle)
            if handle.token_ids is not None:
                self._record("fetched", self._sampler_step.pop(id(handle.token_ids), -1))
            return result

        def timed_schedule():
            self._record("schedule", self._models)
            return schedule()

        runner._run_model, runner._run_sampler, runner.fetch = (timed_model, timed_sampler,
                                                                timed_fetch)
        scheduler.schedule = timed_schedule
        self.mask_s: list[float] = []  # seconds of each grammar bitmask fill
        if engine.structured is not None:
            bitmask = engine.structured.bitmask

            def timed_bitmask(*args, **kwargs):
                start = time.perf_counter()
                out = bitmask(*args, **kwargs)
                self.mask_s.append(time.perf_counter() - start)
                return out
            engine.structured.bitmask = timed_bitmask

    def _record(self, kind: str, step: int) -> None:
        self.events.append(_Event(kind, step, time.perf_counter()))

    def clear(self) -> None:
        self.events.clear()
        self.mask_s.clear()

    def per_step(self) -> list[dict]:
        """One entry per model launch k that has a launch of sampler k - 1 and a fetch of step
        k - 2 before it."""
        first: dict[tuple[str, int], float] = {}
        order: dict[tuple[str, int], int] = {}
        for i, e in enumerate(self.events):
            first.setdefault((e.kind, e.step), e.t)
            order.setdefault((e.kind, e.step), i)
        rows = []
        for (kind, k), t_model in first.items():
            if kind != "model" or ("sampler", k - 1) not in first or ("fetched", k - 2) not in first:
                continue
            t_fetched, t_sampler = first[("fetched", k - 2)], first[("sampler", k - 1)]
            if t_fetched > t_model:
                continue  # a synchronous step: its tokens were fetched after it was launched
            lo, hi = order[("sampler", k - 1)], order[("model", k)]
            rows.append({"step": k, "model_path_ms": 1e3 * (t_model - t_fetched),
                         "sampler_gap_ms": 1e3 * (t_model - t_sampler),
                         "work_in_gap": any(e.kind == "schedule"
                                            for e in self.events[lo + 1:hi])})
        return rows

    def summary(self) -> dict:
        rows = self.per_step()
        if not rows:
            return {"steps": 0}

        def stats(key: str) -> dict:
            values = sorted(r[key] for r in rows)
            return {"mean": statistics.fmean(values), "median": values[len(values) // 2],
                    "p90": values[int(0.9 * (len(values) - 1))], "max": values[-1]}
        return {"steps": len(rows), "model_path_ms": stats("model_path_ms"),
                "sampler_gap_ms": stats("sampler_gap_ms"),
                "scheduled_in_gap": sum(r["work_in_gap"] for r in rows),
                "mask_fills": len(self.mask_s),
                "mask_fill_ms_median": (1e3 * sorted(self.mask_s)[len(self.mask_s) // 2]
                                        if self.mask_s else None)}
