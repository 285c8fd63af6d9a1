"""``ReplicaEngine``'s failure rules with scripted replicas (no Ray): a replica that dies before
a request streamed anything sends it to another, one that dies after fails it, no serving
replica is a 503, a client that leaves cancels the replica's generator, and the router's charge
is given back in every case."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from jaxpaged.distributed.metrics import FrontEndMetrics
from jaxpaged.distributed.replica_engine import ReplicaEngine
from jaxpaged.distributed.replica_protocol import ReplicaAdmitted, ReplicaFailure
from jaxpaged.distributed.router import Router
from jaxpaged.outputs import CompletionOutput, RequestOutput
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
from jaxpaged.server.async_engine import (EngineInput, EngineUnavailableError,
                                          RequestFailedError)


class RayError(Exception):
    pass


class RayTaskError(RayError):
    pass


class ActorDied(RayError):
    pass


class FakeRay:
    exceptions = types.SimpleNamespace(RayError=RayError, RayTaskError=RayTaskError)

    def __init__(self):
        self.cancelled = []

    def cancel(self, generator):
        self.cancelled.append(generator)


class Script:
    """A replica's ``generate`` stream: items, and an exception to raise at the end."""

    def __init__(self, items, then: BaseException | None = None):
        self._items, self._then = list(items), then

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._items:
            item = self._items.pop(0)
            return asyncio.sleep(0, result=item)
        if self._then is not None:
            raise self._then
        raise StopAsyncIteration


class FakeReplica:
    def __init__(self, *scripts: Script):
        self._scripts = list(scripts)
        self.generate = self
        self.calls = 0

    def options(self, **_):
        return self

    def remote(self, inputs):
        self.calls += 1
        return self._scripts.pop(0)


class FakeSupervisor:
    def __init__(self, replicas):
        self.replicas = replicas
        self.dead: list[int] = []

    def serving(self):
        return [i for i in range(len(self.replicas)) if i not in self.dead]

    def handle(self, index):
        return self.replicas[index]

    def report_dead(self, index, handle, error):
        self.dead.append(index)


def output(text_ids: list[int], finished: bool) -> RequestOutput:
    seq = CompletionOutput(index=0, text="x" * len(text_ids), token_ids=text_ids,
                           cumulative_logprob=None, logprobs=None,
                           finish_reason="length" if finished else None)
    return RequestOutput(request_id="r-0", prompt=None, prompt_token_ids=[1, 2],
                         prompt_logprobs=None, outputs=[seq], finished=finished)


def engine_over(*replicas: FakeReplica) -> tuple[ReplicaEngine, FakeRay, FakeSupervisor]:
    ray, supervisor = FakeRay(), FakeSupervisor(list(replicas))
    engine = ReplicaEngine(ray, supervisor, Router(len(replicas), 16, slack_tokens=0),
                           FrontEndMetrics("tiny", len(replicas)), max_model_len=64)
    return engine, ray, supervisor


def inputs() -> list[EngineInput]:
    params = SamplingParams(max_tokens=3, output_kind=RequestOutputKind.DELTA)
    return [EngineInput("r-0", None, [1, 2], params, time.time())]


async def collect(engine: ReplicaEngine) -> list[RequestOutput]:
    return [o async for o in await engine.submit(inputs())]


def test_died_before_streaming_is_retried_on_another_replica():
    dying = FakeReplica(Script([ReplicaAdmitted(0)], then=ActorDied("gone")))
    healthy = FakeReplica(Script([ReplicaAdmitted(1), output([5], False), output([6, 7], True)]))
    engine, _, supervisor = engine_over(dying, healthy)
    outputs = asyncio.run(collect(engine))
    assert [o.outputs[0].token_ids for o in outputs] == [[5], [6, 7]]
    assert supervisor.dead == [0] and (dying.calls, healthy.calls) == (1, 1)
    assert engine.router.outstanding == [0, 0]
    assert engine.metrics.retried._value.get() == 1


def test_died_after_streaming_fails_the_request():
    dying = FakeReplica(Script([ReplicaAdmitted(0), output([5], False)], then=ActorDied("gone")))
    other = FakeReplica()
    engine, _, _ = engine_over(dying, other)

    async def run():
        stream = await engine.submit(inputs())
        first = await anext(stream)
        with pytest.raises(RequestFailedError, match="engine replica 0 died while running"):
            await anext(stream)
        return first

    assert asyncio.run(run()).outputs[0].token_ids == [5]
    assert other.calls == 0 and engine.router.outstanding == [0, 0]


def test_no_serving_replica_is_unavailable_and_engine_refusals_pass_through():
    engine, _, _ = engine_over(FakeReplica(Script([], then=ActorDied("gone"))))
    with pytest.raises(EngineUnavailableError, match="no engine replica is serving"):
        asyncio.run(collect(engine))
    refusing = FakeReplica(Script([ReplicaFailure("invalid", "prompt too long")]))
    engine, _, _ = engine_over(refusing)
    with pytest.raises(ValueError, match="prompt too long"):
        asyncio.run(collect(engine))
    assert engine.router.outstanding == [0]


def test_closing_a_stream_cancels_the_replica_generator():
    script = Script([ReplicaAdmitted(0), output([5], False), output([6], False)])
    engine, ray, _ = engine_over(FakeReplica(script))

    async def leave_early():
        stream = await engine.submit(inputs())
        await anext(stream)
        stream.close()

    asyncio.run(leave_early())
    assert ray.cancelled == [script] and engine.router.outstanding == [0]
