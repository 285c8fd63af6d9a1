"""Scheduler driven by a fake runner (vLLM style): batching, prefix cache, preemption, finishing,
parallel sampling, and a hypothesis property test over random add/step/abort/finish sequences."""

import dataclasses
import random

import pytest
from engine_testing import (
    EOS_TOKEN_ID,
    FakeRunner,
    check_invariants,
    create_requests,
    create_scheduler,
    run_to_completion,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxpaged.core.request import Request, RequestStatus
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.core.scheduler import QueueFullError, SchedulerConfig


def add_all(scheduler, requests):
    for request in requests:
        scheduler.add_request(request)
    return requests


def batch(output):
    return [(s.req_id, s.num_new_tokens) for s in output.scheduled]


# ----- batching -----


def test_fcfs_order_and_one_token_budget_for_prefill_and_decode():
    scheduler = create_scheduler(max_num_batched_tokens=16)
    r0, r1, r2 = add_all(scheduler, create_requests(3, 10))
    runner = FakeRunner(scheduler)
    out, updates = runner.step()
    assert batch(out) == [("r0", 10), ("r1", 6)] and out.total_num_scheduled_tokens == 16
    assert [s.do_sample for s in out.scheduled] == [True, False]
    assert [u.request.request_id for u in updates] == ["r0"] and r1.num_output_tokens == 0
    out, _ = runner.step()  # r0 decodes, r1 finishes its prefill, r2 takes what is left
    assert batch(out) == [("r0", 1), ("r1", 4), ("r2", 10)]
    assert out.scheduled[0].token_ids == [r0.output_token_ids[0]]
    assert out.scheduled[1].token_ids == r1.prompt_token_ids[6:]
    assert out.scheduled[1].num_computed_tokens == 6
    assert scheduler.num_running == 3 and scheduler.num_waiting == 0


def test_chunked_prefill_feeds_exact_slices_and_samples_only_at_the_end():
    scheduler = create_scheduler(max_num_batched_tokens=16)
    (request,) = add_all(scheduler, create_requests(1, 40))
    runner = FakeRunner(scheduler)
    for start, size, sample in [(0, 16, False), (16, 16, False), (32, 8, True)]:
        out, updates = runner.step()
        (scheduled,) = out.scheduled
        assert (scheduled.num_computed_tokens, scheduled.num_new_tokens) == (start, size)
        assert scheduled.token_ids == request.prompt_token_ids[start : start + size]
        assert scheduled.do_sample == sample and bool(updates) == sample
        assert len(scheduled.block_ids) == -(-(start + size) // 4)
    assert request.num_output_tokens == 1 and request.num_computed_tokens == 40


def test_chunked_prefill_off_schedules_prompts_whole():
    scheduler = create_scheduler(
        max_model_len=32, max_num_batched_tokens=32, enable_chunked_prefill=False
    )
    add_all(scheduler, create_requests(2, 20))
    runner = FakeRunner(scheduler)
    out, _ = runner.step()
    assert batch(out) == [("r0", 20)]
    out, _ = runner.step()
    assert batch(out) == [("r0", 1), ("r1", 20)]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_model_len=64, max_num_batched_tokens=32, enable_chunked_prefill=False)


def test_chunked_prefill_off_does_not_split_the_prompts_of_forked_samples():
    """n > 1 requests compute their shared prefix, then fork: each child still has the rest of
    the prompt to compute, and without chunked prefill that rest is never cut to the budget (a
    child that does not fit waits a step)."""
    scheduler = create_scheduler(max_model_len=16, block_size=4, max_num_batched_tokens=16,
                                 num_blocks=32, enable_chunked_prefill=False)
    for i, (length, n) in enumerate([(7, 2), (8, 3)]):
        scheduler.add_request(Request(f"q{i}", list(range(10, 10 + length)),
                                      SamplingParams(n=n), eos_token_id=EOS_TOKEN_ID))
    runner = FakeRunner(scheduler)
    out, _ = runner.step()
    assert batch(out) == [("q0", 4), ("q1", 4)]  # the shared full blocks
    out, _ = runner.step()  # 3 + 3 + 4 + 4 = 14 tokens; q1-2's 4 more would exceed 16
    assert batch(out) == [("q0-0", 3), ("q0-1", 3), ("q1-0", 4), ("q1-1", 4)]
    out, _ = runner.step()
    assert ("q1-2", 4) in batch(out)


def test_max_num_seqs_caps_the_running_set():
    scheduler = create_scheduler(max_num_seqs=2)
    add_all(scheduler, create_requests(3, 5, max_tokens=2))
    runner = FakeRunner(scheduler)
    out, _ = runner.step()
    assert batch(out) == [("r0", 5), ("r1", 5)] and scheduler.num_waiting == 1
    out, updates = runner.step()
    assert batch(out) == [("r0", 1), ("r1", 1)] and all(u.finished for u in updates)
    out, _ = runner.step()
    assert batch(out) == [("r2", 5)] and out.finished_req_ids == {"r0", "r1"}


def test_waiting_requests_are_admitted_only_while_blocks_last():
    scheduler = create_scheduler(num_blocks=9, max_model_len=32)  # 8 usable blocks
    add_all(scheduler, create_requests(3, 12))  # 3 blocks each
    out, _ = FakeRunner(scheduler).step()
    assert batch(out) == [("r0", 12), ("r1", 12)] and scheduler.num_waiting == 1
    assert scheduler.block_manager.num_free_blocks == 2


# ----- prefix caching -----


@pytest.mark.parametrize("extra_tokens, expected_hit", [(0, 8), (1, 12), (3, 12)])
def test_prefix_cache_reuses_full_blocks_but_never_the_last_token(extra_tokens, expected_hit):
    scheduler = create_scheduler()
    prompt = list(range(20, 32))  # 3 full blocks
    first = Request("first", prompt, SamplingParams(), eos_token_id=EOS_TOKEN_ID)
    scheduler.add_request(first)
    runner = FakeRunner(scheduler)
    runner.step()
    second_prompt = prompt + list(range(90, 90 + extra_tokens))
    scheduler.add_request(Request("second", second_prompt, SamplingParams()))
    out, _ = runner.step()
    second = out.scheduled[1]
    assert second.num_computed_tokens == expected_hit
    assert second.token_ids == second_prompt[expected_hit:]
    shared = scheduler.block_manager.get_block_ids("first")[: expected_hit // 4]
    assert second.block_ids[: len(shared)] == shared
    assert all(scheduler.block_manager.ref_count(b) == 2 for b in shared)
    assert scheduler.requests["second"].num_cached_tokens == expected_hit
    stats = scheduler.make_stats()
    queries = 12 + len(second_prompt)
    assert (stats.prefix_cache_hits, stats.prefix_cache_queries) == (expected_hit, queries)


def test_prefix_caching_off_recomputes_everything():
    scheduler = create_scheduler(enable_prefix_caching=False)
    add_all(scheduler, create_requests(1, 12, prefix=list(range(12))))
    runner = FakeRunner(scheduler)
    runner.step()
    scheduler.add_request(create_requests(1, 13, prefix=list(range(12)), id_prefix="s")[0])
    out, _ = runner.step()
    assert batch(out)[1] == ("s0", 13)


# ----- preemption -----


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preemption_by_recompute_under_a_tiny_pool(enable_prefix_caching):
    kwargs = dict(num_blocks=7, max_model_len=24, enable_prefix_caching=enable_prefix_caching)
    scheduler = create_scheduler(**kwargs)  # 6 usable blocks
    r0, r1 = add_all(scheduler, create_requests(2, 8, max_tokens=12))
    runner = FakeRunner(scheduler)
    runner.step()
    runner.step()  # both hold 3 blocks now: the pool is full
    (r2,) = add_all(scheduler, create_requests(1, 8, max_tokens=12, id_prefix="late"))
    for _ in range(3):
        out, _ = runner.step()
        assert batch(out) == [("r0", 1), ("r1", 1)]  # r2 cannot get blocks
    out, _ = runner.step()  # r0 needs a 4th block: the latest running request is the victim
    assert out.preempted_req_ids == {"r1"} and batch(out) == [("r0", 1)]
    assert r1.status == RequestStatus.PREEMPTED and r1.num_computed_tokens == 0
    assert scheduler.block_manager.get_block_ids("r1") == [] and r1.num_output_tokens == 5
    assert list(scheduler.waiting) == [r1, r2]  # the victim goes to the front
    assert scheduler.num_preemptions == 1 and r1.num_preemptions == 1
    finished = run_to_completion(runner)
    assert set(finished) == {"r0", "r1", "late0"}

    reference = create_scheduler(num_blocks=64, max_model_len=24)
    add_all(reference, create_requests(2, 8, max_tokens=12))
    add_all(reference, create_requests(1, 8, max_tokens=12, id_prefix="late"))
    expected = run_to_completion(FakeRunner(reference))
    for rid, request in finished.items():
        assert request.output_token_ids == expected[rid].output_token_ids
        assert request.get_finished_reason() == "length"
    assert scheduler.block_manager.num_free_blocks == 6


def test_the_last_running_request_preempts_itself_when_it_cannot_grow():
    scheduler = create_scheduler(num_blocks=5, max_model_len=16)  # 4 usable blocks
    r0 = create_requests(1, 6, max_tokens=8)[0]
    r1 = create_requests(1, 8, max_tokens=8, id_prefix="s")[0]
    add_all(scheduler, [r0, r1])
    runner = FakeRunner(scheduler)
    runner.step()  # 2 blocks each: the pool is full
    out, _ = runner.step()  # r0's position 6 fits its block 2; s0's position 8 needs a 3rd
    assert out.preempted_req_ids == {"s0"} and batch(out) == [("r0", 1)]
    assert scheduler.running == [r0] and list(scheduler.waiting) == [r1]
    finished = run_to_completion(runner)
    assert {rid: r.num_output_tokens for rid, r in finished.items()} == {"r0": 8, "s0": 8}


# ----- finishing -----


def scripted(script):
    return lambda s: script[s.req_id][len(s.output_token_ids)]


def test_length_finishes_on_max_tokens_and_max_model_len():
    scheduler = create_scheduler(max_model_len=16)
    short = create_requests(1, 10, max_tokens=3, id_prefix="short")[0]
    capped = create_requests(1, 14, max_tokens=None, id_prefix="capped")[0]
    add_all(scheduler, [short, capped])
    finished = run_to_completion(FakeRunner(scheduler))
    assert finished["short0"].num_output_tokens == 3
    assert finished["capped0"].num_output_tokens == 2  # 14 + 2 = max_model_len
    assert {r.get_finished_reason() for r in finished.values()} == {"length"}
    assert scheduler.block_manager.num_free_blocks == 63


def test_prompt_of_max_model_len_gets_one_token():
    scheduler = create_scheduler(max_model_len=16)
    (request,) = add_all(scheduler, create_requests(1, 16, max_tokens=None))
    run_to_completion(FakeRunner(scheduler))
    assert request.num_output_tokens == 1 and request.get_finished_reason() == "length"


def test_eos_stop_tokens_min_tokens_and_ignore_eos():
    scheduler = create_scheduler()
    eos = create_requests(1, 5, id_prefix="eos")[0]
    stop = create_requests(1, 5, id_prefix="stop", stop_token_ids=[42])[0]
    late = create_requests(1, 5, id_prefix="min", min_tokens=3)[0]
    ignore = create_requests(1, 5, id_prefix="ign", ignore_eos=True, max_tokens=4)[0]
    add_all(scheduler, [eos, stop, late, ignore])
    script = {
        "eos0": [5, EOS_TOKEN_ID, 5],
        "stop0": [5, 42, 5],
        "min0": [EOS_TOKEN_ID, 42, 5, EOS_TOKEN_ID, 5],
        "ign0": [EOS_TOKEN_ID] * 5,
    }
    run_to_completion(FakeRunner(scheduler, scripted(script)))
    assert (eos.output_token_ids, eos.get_finished_reason(), eos.stop_reason) == (
        [5, EOS_TOKEN_ID],
        "stop",
        None,
    )
    assert (stop.output_token_ids, stop.stop_reason) == ([5, 42], 42)
    assert stop.get_finished_reason() == "stop"
    assert late.output_token_ids == [EOS_TOKEN_ID, 42, 5, EOS_TOKEN_ID]
    assert (ignore.output_token_ids, ignore.get_finished_reason()) == ([EOS_TOKEN_ID] * 4, "length")


def test_length_wins_over_stop_on_the_last_allowed_token():
    scheduler = create_scheduler()
    (request,) = add_all(scheduler, create_requests(1, 5, max_tokens=2))
    run_to_completion(FakeRunner(scheduler, scripted({"r0": [5, EOS_TOKEN_ID]})))
    assert request.get_finished_reason() == "length"  # vLLM checks length first


def test_several_sampled_tokens_are_cut_after_a_stop():
    scheduler = create_scheduler()
    (request,) = add_all(scheduler, create_requests(1, 5, stop_token_ids=[42]))
    out = scheduler.schedule()
    (update,) = scheduler.update_from_output(out, {"r0": [5, 42, 7]})
    assert update.new_token_ids == [5, 42] and update.finished
    assert request.output_token_ids == [5, 42] and request.stop_reason == 42


def test_sampled_rows_aligned_with_the_batch_and_missing_samples():
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(2, 5))
    out = scheduler.schedule()
    updates = scheduler.update_from_output(out, [[7], 8])
    assert [u.new_token_ids for u in updates] == [[7], [8]]
    out = scheduler.schedule()
    with pytest.raises(ValueError, match="r1"):
        scheduler.update_from_output(out, {"r0": [1]})
    with pytest.raises(ValueError, match="rows"):
        scheduler.update_from_output(out, [[1]])


# ----- abort and finish from outside -----


def test_abort_waiting_and_running_requests():
    scheduler = create_scheduler(max_num_seqs=1)
    r0, r1 = add_all(scheduler, create_requests(2, 9))
    out = scheduler.schedule()
    assert batch(out) == [("r0", 9)] and scheduler.block_manager.num_free_blocks == 60
    assert scheduler.abort_request("r1") == [r1]
    assert scheduler.abort_request("r0") == [r0]
    assert scheduler.update_from_output(out, {"r0": [5]}) == []  # results of aborted requests
    assert r0.get_finished_reason() == r1.get_finished_reason() == "abort"
    assert scheduler.abort_request("r0") == [] and scheduler.abort_request("nobody") == []
    assert not scheduler.has_unfinished_requests()
    assert scheduler.block_manager.num_free_blocks == 63
    assert scheduler.schedule().finished_req_ids == {"r0", "r1"}


def test_finish_request_with_a_stop_string():
    scheduler = create_scheduler()
    (request,) = add_all(scheduler, create_requests(1, 5))
    FakeRunner(scheduler).step()
    scheduler.finish_request("r0", RequestStatus.FINISHED_STOPPED, stop_reason="###")
    assert (request.get_finished_reason(), request.stop_reason) == ("stop", "###")
    with pytest.raises(ValueError, match="status"):
        scheduler.finish_request("r0", RequestStatus.RUNNING)


# ----- priority -----


def test_priority_policy_orders_waiting_and_picks_victims():
    scheduler = create_scheduler(max_num_seqs=1, policy="priority")
    add_all(scheduler, create_requests(3, 5, max_tokens=1, priorities=[5, 1, 3]))
    runner = FakeRunner(scheduler)
    order = [batch(runner.step()[0])[0][0] for _ in range(3)]
    assert order == ["r1", "r2", "r0"]

    scheduler = create_scheduler(num_blocks=7, max_model_len=24, policy="priority")
    low, high = add_all(scheduler, create_requests(2, 8, max_tokens=12, priorities=[5, 0]))
    runner = FakeRunner(scheduler)
    preempted = set()
    for _ in range(6):
        preempted |= runner.step()[0].preempted_req_ids
    assert preempted == {"r0"}  # the low-priority request loses even though it came first
    run_to_completion(runner)
    assert low.num_output_tokens == high.num_output_tokens == 12


# ----- parallel sampling -----


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_n_samples_share_the_prompt_blocks(enable_prefix_caching):
    scheduler = create_scheduler(enable_prefix_caching=enable_prefix_caching)
    (parent,) = add_all(scheduler, create_requests(1, 10, n=3, seed=7, id_prefix="p"))
    bm = scheduler.block_manager
    runner = FakeRunner(scheduler)
    out, updates = runner.step()
    assert batch(out) == [("p0", 8)] and not out.scheduled[0].do_sample and updates == []
    children = [scheduler.requests[f"p0-{i}"] for i in range(3)]
    assert "p0" not in scheduler.requests and scheduler.running == children
    shared = bm.get_block_ids("p0-0")
    assert len(shared) == 2 and all(bm.get_block_ids(c.request_id) == shared for c in children)
    assert [bm.ref_count(b) for b in shared] == [3, 3] and bm.num_free_blocks == 63 - 2
    assert [(c.parent_id, c.sample_index, c.sampling_params.seed) for c in children] == [
        ("p0", 0, 7),
        ("p0", 1, 8),
        ("p0", 2, 9),
    ]
    assert all(c.sampling_params.n == 1 for c in children) and parent.sampling_params.n == 3

    out, updates = runner.step()
    assert batch(out) == [("p0-0", 2), ("p0-1", 2), ("p0-2", 2)] and out.finished_req_ids == {"p0"}
    assert all(s.token_ids == parent.prompt_token_ids[8:] and s.do_sample for s in out.scheduled)
    assert all(s.block_ids[:2] == shared for s in out.scheduled)
    assert bm.num_free_blocks == 63 - 5  # 2 shared + one tail block per child
    assert len(updates) == 3 and len({c.output_token_ids[0] for c in children}) == 3
    finished = run_to_completion(runner)
    assert set(finished) == {"p0-0", "p0-1", "p0-2"}
    assert bm.num_free_blocks == 63


def test_n_samples_of_a_short_prompt_fork_at_once():
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(1, 3, n=3, id_prefix="p"))
    assert [r.request_id for r in scheduler.waiting] == ["p0-0", "p0-1", "p0-2"]
    out, _ = FakeRunner(scheduler).step()
    assert batch(out) == [("p0-0", 3), ("p0-1", 3), ("p0-2", 3)]


def test_n_samples_with_a_cached_prefix_fork_on_admission():
    scheduler = create_scheduler()
    (first,) = add_all(scheduler, create_requests(1, 10, prefix=list(range(30, 40)), id_prefix="f"))
    runner = FakeRunner(scheduler)
    runner.step()
    add_all(scheduler, create_requests(1, 10, prefix=list(range(30, 40)), n=2, id_prefix="p"))
    out, _ = runner.step()
    assert batch(out) == [("f0", 1), ("p0-0", 2), ("p0-1", 2)]
    shared = scheduler.block_manager.get_block_ids("f0")[:2]
    assert all(s.block_ids[:2] == shared for s in out.scheduled)
    assert [scheduler.block_manager.ref_count(b) for b in shared] == [3, 3]


def test_abort_of_a_parent_aborts_all_children():
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(1, 10, n=3, id_prefix="p"))
    runner = FakeRunner(scheduler)
    runner.step()
    runner.step()
    aborted = scheduler.abort_request("p0")
    assert sorted(r.request_id for r in aborted) == ["p0-0", "p0-1", "p0-2"]
    assert not scheduler.has_unfinished_requests() and scheduler.block_manager.num_free_blocks == 63
    assert scheduler.abort_request("p0") == []


def test_a_parent_reserves_a_slot_for_each_sample():
    scheduler = create_scheduler(max_num_seqs=4)
    add_all(scheduler, create_requests(1, 5, max_tokens=2))
    add_all(scheduler, create_requests(1, 10, n=4, id_prefix="p"))
    runner = FakeRunner(scheduler)
    out, _ = runner.step()
    assert batch(out) == [("r0", 5)]  # 1 + 4 slots > max_num_seqs
    runner.step()
    out, _ = runner.step()
    assert batch(out) == [("p0", 8)] and scheduler.num_running == 4
    with pytest.raises(ValueError, match="n=5"):
        scheduler.add_request(create_requests(1, 5, n=5, id_prefix="big")[0])


# ----- bad input -----


def test_add_request_rejects_bad_requests():
    scheduler = create_scheduler(max_model_len=16, max_waiting=2)
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(create_requests(1, 17)[0])
    add_all(scheduler, create_requests(1, 4, n=2, id_prefix="x"))  # forks into x0-0, x0-1
    with pytest.raises(ValueError, match="x0-1"):
        scheduler.add_request(Request("x0-1", [1, 2], SamplingParams()))
    with pytest.raises(QueueFullError):
        scheduler.add_request(create_requests(1, 5)[0])
    scheduler = create_scheduler()
    scheduler.add_request(create_requests(1, 9, n=2, id_prefix="p")[0])  # not forked yet
    with pytest.raises(ValueError, match="reserved"):
        scheduler.add_request(Request("p0-1", [1, 2], SamplingParams()))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(Request("p0", [1, 2], SamplingParams()))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Request("empty", [], SamplingParams())


def test_request_accepts_numpy_ids_and_rejects_bad_ones():
    import numpy as np

    request = Request("np", np.array([3, 4], np.int64), SamplingParams(), arrival_time=0.0)
    assert request.prompt_token_ids == [3, 4] and type(request.prompt_token_ids[0]) is int
    assert (request.num_tokens, request.status) == (2, RequestStatus.WAITING)
    for bad in ([1, -2], [1.5], ["a"]):
        with pytest.raises(ValueError, match="prompt_token_ids"):
            Request("bad", bad, SamplingParams())
    with pytest.raises(ValueError, match="request_id"):
        Request("", [1], SamplingParams())
    with pytest.raises(ValueError, match="sampling_params"):
        Request("x", [1], {"temperature": 0})


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_model_len", 0),
        ("max_num_seqs", 0),
        ("max_num_batched_tokens", -1),
        ("block_size", 0),
        ("policy", "lifo"),
        ("max_waiting", 0),
    ],
)
def test_scheduler_config_validation(field, value):
    kwargs = dict(max_model_len=64)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)


def test_pool_must_hold_one_max_len_sequence():
    with pytest.raises(ValueError, match="num_blocks=8"):
        create_scheduler(num_blocks=8, max_model_len=32)  # needs 8 blocks besides block 0


# ----- property test -----

VOCAB = [EOS_TOKEN_ID, 3, 4, 5]
# Prompts are prefixes of these, so prefix-cache hits (full and partial) are common.
BASE_PROMPTS = [list(range(10, 26)), list(range(10, 18)) + list(range(40, 48)), [7] * 16]

request_spec = st.tuples(
    st.builds(lambda b, n: BASE_PROMPTS[b][:n], st.integers(0, 2), st.integers(1, 16)),
    st.one_of(st.none(), st.integers(1, 8)),  # max_tokens
    st.sampled_from([1, 1, 2, 3]),  # n
    st.integers(0, 2),  # priority
    st.booleans(),  # ignore_eos
)
operation = st.one_of(
    st.tuples(st.just("add"), request_spec),
    st.tuples(st.just("add"), request_spec),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 40)),
    st.tuples(st.just("finish"), st.integers(0, 40)),
)
config_spec = st.fixed_dictionaries(
    dict(
        block_size=st.sampled_from([2, 4]),
        extra_blocks=st.integers(0, 4),
        max_num_seqs=st.integers(1, 6),
        max_num_batched_tokens=st.integers(16, 24),
        enable_chunked_prefill=st.booleans(),
        enable_prefix_caching=st.booleans(),
        policy=st.sampled_from(["fcfs", "priority"]),
    )
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=config_spec,
    operations=st.lists(operation, min_size=6, max_size=40),
    seed=st.integers(0, 99),
)
def test_random_workloads_keep_the_pool_consistent(config, operations, seed):
    config = dict(config)
    max_model_len, bs = 16, config["block_size"]
    num_blocks = 1 + max_model_len // bs + config.pop("extra_blocks")
    scheduler = create_scheduler(num_blocks=num_blocks, max_model_len=max_model_len, **config)
    rng = random.Random(seed)
    runner = FakeRunner(scheduler, lambda s: rng.choice(VOCAB))
    added: list[str] = []

    def step():
        out = scheduler.schedule()
        check_invariants(scheduler)
        check_batch(out)
        updates = scheduler.update_from_output(out, runner.run(out))
        for update in updates:
            check_finished(update.request, max_model_len)
        check_invariants(scheduler)

    def check_batch(out):
        assert out.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        assert len(out.scheduled) <= scheduler.config.max_num_seqs
        assert len({s.req_id for s in out.scheduled}) == len(out.scheduled)
        for s in out.scheduled:
            known = len(s.prompt_token_ids) + len(s.output_token_ids)  # before this step's sample
            is_parent = s.sampling_params.n > 1
            assert s.do_sample == (not is_parent and s.seq_len == known)
            if not scheduler.config.enable_chunked_prefill and not is_parent:
                assert s.seq_len == known  # prompts are never split

    for kind, arg in operations:
        if kind == "add":
            prompt, max_tokens, n, priority, ignore_eos = arg
            params = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=ignore_eos)
            request_id = f"q{len(added)}"
            request = Request(
                request_id, prompt, params, priority=priority, eos_token_id=EOS_TOKEN_ID
            )
            if n > scheduler.config.max_num_seqs:
                with pytest.raises(ValueError, match="max_num_seqs"):
                    scheduler.add_request(request)
                continue
            scheduler.add_request(request)
            added.append(request_id)
        elif kind == "step":
            for _ in range(arg):
                step()
        elif added:
            status = RequestStatus.FINISHED_STOPPED
            if kind == "abort":
                status = RequestStatus.FINISHED_ABORTED
            scheduler.finish_request(added[arg % len(added)], status, "stop-string")
        check_invariants(scheduler)

    for _ in range(500):
        if not scheduler.has_unfinished_requests():
            break
        step()
    stats = scheduler.make_stats()
    event(f"preempted: {stats.num_preemptions > 0}")
    event(f"prefix hits: {stats.prefix_cache_hits > 0}")
    event(f"steps > 10: {runner.steps > 10}")
    assert not scheduler.has_unfinished_requests()
    assert scheduler.num_running == scheduler.num_waiting == 0
    assert scheduler.block_manager.num_free_blocks == num_blocks - 1
    assert all(block.ref_cnt == 0 for block in scheduler.block_manager.pool.blocks)


def check_finished(request, max_model_len):
    if not request.is_finished():
        return
    params = request.sampling_params
    limit = params.max_tokens if params.max_tokens is not None else max_model_len
    # A prompt of exactly max_model_len tokens still gets its one token (as in vLLM).
    assert request.num_output_tokens <= limit
    assert request.num_tokens <= max(max_model_len, request.num_prompt_tokens + 1)
    if request.get_finished_reason() == "length":
        assert request.num_output_tokens == limit or request.num_tokens >= max_model_len
    else:
        last = request.output_token_ids[-1]
        assert last == EOS_TOKEN_ID and not params.ignore_eos


def test_dataclass_outputs_are_frozen():
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(1, 5))
    out = scheduler.schedule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.total_num_scheduled_tokens = 0
