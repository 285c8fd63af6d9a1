"""Helpers for CPU-only scheduler tests (vLLM's ``tests/v1/core/utils.py`` idea).

``FakeRunner`` stands in for the model runner: it "writes" each scheduled token into its KV slot
and checks that every position a request attends to holds that request's token, which catches
wrong block tables, bad prefix-cache hits, broken sharing and missed recomputes. Its samples are a
deterministic function of the request, so runs with and without preemption can be compared.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxpaged.core.request import Request
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.core.scheduler import Scheduler, SchedulerConfig
from jaxpaged.core.scheduler_output import RequestUpdate, ScheduledRequest, SchedulerOutput

EOS_TOKEN_ID = 2


def create_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 64,
    **config_kwargs,
) -> Scheduler:
    config = SchedulerConfig(
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=block_size,
        **config_kwargs,
    )
    return Scheduler(config, num_blocks=num_blocks)


def create_requests(
    num_requests: int,
    num_tokens: int = 10,
    *,
    prefix: list[int] | None = None,
    eos_token_id: int | None = EOS_TOKEN_ID,
    priorities: list[int] | None = None,
    id_prefix: str = "r",
    **sampling_kwargs,
) -> list[Request]:
    """``num_requests`` requests of ``num_tokens`` prompt tokens each (ids 10.. never EOS).

    With ``prefix`` every prompt starts with it; otherwise prompts differ in their first two
    tokens (by index and by ``id_prefix``), so nothing hits the prefix cache by accident.
    """
    sampling_kwargs.setdefault("max_tokens", 16)
    requests = []
    for i in range(num_requests):
        head = list(prefix) if prefix is not None else [1000 + i, 3000 + sum(map(ord, id_prefix))]
        body = [10 + (7 * i + j) % 50 for j in range(num_tokens - len(head))]
        requests.append(
            Request(
                request_id=f"{id_prefix}{i}",
                prompt_token_ids=(head + body)[:num_tokens],
                sampling_params=SamplingParams(**sampling_kwargs),
                arrival_time=float(i),
                priority=priorities[i] if priorities else 0,
                eos_token_id=eos_token_id,
            )
        )
    return requests


def default_sample(scheduled: ScheduledRequest) -> int:
    """A token that depends only on the request's id and output length (never EOS)."""
    seed = sum(map(ord, scheduled.req_id))
    return 100 + (len(scheduled.output_token_ids) * 7 + seed) % 50


class FakeRunner:
    """Pretend model runner over a token-valued KV pool (slot -> token id)."""

    def __init__(
        self, scheduler: Scheduler, sample: Callable[[ScheduledRequest], int] = default_sample
    ) -> None:
        self.scheduler = scheduler
        self.sample = sample
        self.block_size = scheduler.config.block_size
        self.slots: dict[int, int] = {}
        self.steps = 0

    def slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def run(self, output: SchedulerOutput) -> dict[str, list[int]]:
        bm = self.scheduler.block_manager
        for s in output.scheduled:
            assert 0 not in s.block_ids, f"{s.req_id} has the null block in its table"
            assert len(s.block_ids) * self.block_size >= s.seq_len, f"{s.req_id} table too short"
            for offset, token in enumerate(s.token_ids):
                block_id = s.block_ids[(s.num_computed_tokens + offset) // self.block_size]
                # NOTE: shared (prefix-cached or sibling) blocks are full and must never be written;
                # only an n > 1 parent, forked as soon as this step was scheduled, writes the
                # blocks that its children now share.
                forked_parent = s.req_id not in self.scheduler.requests
                shared = bm.ref_count(block_id) != 1
                assert forked_parent or not shared, f"{s.req_id} writes shared block {block_id}"
                assert bm.pool.blocks[block_id].block_hash is None, f"writes cached {block_id}"
                self.slots[self.slot(s.block_ids, s.num_computed_tokens + offset)] = token
        for s in output.scheduled:
            tokens = list(s.prompt_token_ids) + list(s.output_token_ids)
            for position in range(s.seq_len):
                got = self.slots.get(self.slot(s.block_ids, position))
                assert got == tokens[position], f"{s.req_id}: KV at {position} is {got}"
        self.steps += 1
        return {s.req_id: [self.sample(s)] for s in output.scheduled if s.do_sample}

    def step(self) -> tuple[SchedulerOutput, list[RequestUpdate]]:
        output = self.scheduler.schedule()
        check_invariants(self.scheduler)
        return output, self.scheduler.update_from_output(output, self.run(output))


def run_to_completion(runner: FakeRunner, max_steps: int = 1000) -> dict[str, Request]:
    """Step until nothing is left; returns the finished requests by id."""
    finished: dict[str, Request] = {}
    for _ in range(max_steps):
        if not runner.scheduler.has_unfinished_requests():
            return finished
        _, updates = runner.step()
        finished.update({u.request.request_id: u.request for u in updates if u.finished})
        check_invariants(runner.scheduler)
    raise AssertionError(f"not finished after {max_steps} steps")


def check_invariants(scheduler: Scheduler) -> None:
    """Ref counts equal table membership; free queue = unreferenced blocks; sharing is legal."""
    bm = scheduler.block_manager
    owners: dict[int, list[Request]] = {}
    for request in scheduler.requests.values():
        table = bm.get_block_ids(request.request_id)
        assert len(set(table)) == len(table), f"{request.request_id} holds a block twice"
        if request.status != request.status.RUNNING:
            assert not table, f"{request.request_id} holds blocks while {request.status.name}"
        else:
            assert len(table) >= bm.num_blocks_for(request.num_computed_tokens)
        for block_id in table:
            owners.setdefault(block_id, []).append(request)
    free = bm.pool.free_block_ids()
    free_set = set(free)
    assert len(free_set) == len(free) and 0 not in free_set
    for block in bm.pool.blocks[1:]:
        holders = owners.get(block.block_id, [])
        assert block.ref_cnt == len(holders), f"block {block.block_id}: ref {block.ref_cnt}"
        assert (block.ref_cnt == 0) == (block.block_id in free_set)
        parents = {r.parent_id for r in holders}
        shared_legally = block.block_hash is not None or (len(parents) == 1 and None not in parents)
        assert len(holders) <= 1 or shared_legally, f"block {block.block_id} shared illegally"
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
