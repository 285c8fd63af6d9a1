"""The replicas' lifetimes: start them, notice when one dies, restart it.

A replica is ``serving`` or ``restarting``. It is found dead when a call to it raises Ray's
actor errors (the front end reports it) or when its periodic ``ping`` fails or does not answer
within ``ping_timeout_s``. A dead replica is killed for good (``ray.kill``: Ray's own restart is
off, ``max_restarts=0``) and a fresh actor takes its slot; until that one answers ``facts`` the
router sends it nothing. Restarts that fail are retried with a growing pause.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Callable
from typing import Any, Literal

logger = logging.getLogger(__name__)

ReplicaState = Literal["serving", "restarting"]
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclasses.dataclass
class ReplicaSlot:
    index: int
    handle: Any  # the Ray actor handle
    state: ReplicaState = "serving"
    pid: int | None = None  # the actor's process id, on its node
    restarts: int = 0
    last_error: str | None = None

    def report(self) -> dict[str, Any]:
        return {"replica": self.index, "state": self.state, "pid": self.pid,
                "restarts": self.restarts,
                **({"last_error": self.last_error} if self.last_error else {})}


class ReplicaSupervisor:
    """``spawn(index)`` creates replica ``index``'s actor (``serve.py``)."""

    def __init__(self, ray, spawn: Callable[[int], Any], num_replicas: int, *,
                 ping_interval_s: float = 2.0, ping_timeout_s: float = 30.0):
        self._ray = ray
        self._spawn = spawn
        self.slots = [ReplicaSlot(i, None) for i in range(num_replicas)]
        self._ping_interval_s = ping_interval_s
        self._ping_timeout_s = ping_timeout_s
        self._tasks: set[asyncio.Task] = set()
        self._on_restarted: Callable[[int], None] = lambda index: None

    def start_replicas(self) -> Any:
        """Create every replica and wait until each is ready; returns replica 0's facts."""
        for slot in self.slots:
            slot.handle = self._spawn(slot.index)
        facts = self._ray.get([slot.handle.facts.remote() for slot in self.slots])
        pids = self._ray.get([slot.handle.pid.remote() for slot in self.slots])
        for slot, pid in zip(self.slots, pids):
            slot.pid = pid
        return facts[0]

    def serving(self) -> list[int]:
        return [slot.index for slot in self.slots if slot.state == "serving"]

    def handle(self, index: int) -> Any:
        return self.slots[index].handle

    def watch(self, loop: asyncio.AbstractEventLoop,
              on_restarted: Callable[[int], None] = lambda index: None) -> None:
        """Ping the replicas every ``ping_interval_s`` on ``loop`` from now on."""
        self._on_restarted = on_restarted
        self._track(loop.create_task(self._watch()))

    def report_dead(self, index: int, handle: Any, error: BaseException | str) -> bool:
        """Replica ``index`` (the actor ``handle``) failed a call; restart it unless that
        already happened or is under way. Event loop only. True when this report started it."""
        slot = self.slots[index]
        if slot.handle is not handle or slot.state != "serving":
            return False
        slot.state, slot.last_error = "restarting", str(error).splitlines()[0][:500]
        logger.error("replica %d died (%s); restarting it", index, slot.last_error)
        self._track(asyncio.get_running_loop().create_task(self._restart(slot)))
        return True

    def stop(self) -> None:
        """Kill every replica (thread-safe; the watch task dies with its loop)."""
        for task in list(self._tasks):
            task.get_loop().call_soon_threadsafe(task.cancel)
        for slot in self.slots:
            self._kill(slot.handle)

    # ----- event loop -----

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._ping_interval_s)
            for slot in self.slots:
                if slot.state == "serving":
                    self._track(asyncio.get_running_loop().create_task(self._ping(slot)))

    async def _ping(self, slot: ReplicaSlot) -> None:
        handle = slot.handle
        try:
            async with asyncio.timeout(self._ping_timeout_s):
                if await handle.ping.remote():
                    return
            error = "its engine stopped taking requests"
        except TimeoutError:
            error = f"no answer to a ping within {self._ping_timeout_s} s"
        except Exception as e:  # RayActorError and kin: the actor is gone
            error = f"{type(e).__name__}: {e}"
        self.report_dead(slot.index, handle, error)

    async def _restart(self, slot: ReplicaSlot) -> None:
        self._kill(slot.handle)
        for attempt in itertools.count():
            handle = None
            try:
                handle = self._spawn(slot.index)
                await handle.facts.remote()
                pid = await handle.pid.remote()
            except Exception as e:
                self._kill(handle)
                slot.last_error = f"restart failed: {type(e).__name__}: {e}".splitlines()[0]
                pause = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                logger.error("replica %d: %s; trying again in %s s", slot.index,
                             slot.last_error, pause)
                await asyncio.sleep(pause)
                continue
            slot.handle, slot.pid, slot.restarts = handle, pid, slot.restarts + 1
            slot.state = "serving"
            logger.info("replica %d is back (restart %d)", slot.index, slot.restarts)
            self._on_restarted(slot.index)
            return

    def _kill(self, handle: Any) -> None:
        if handle is None:
            return
        try:
            self._ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            pass
