"""The live view's data: the pool's block states (numpy views of the pool's mirrors of the blocks'
ref counts and hashes), the cells the page draws, and the step history of the last minute."""

import numpy as np
import pytest

from jaxpaged.core.block_manager import BlockManager
from jaxpaged.core.scheduler import Scheduler, SchedulerConfig
from jaxpaged.server.live_view import (BLOCK_CACHED, BLOCK_FREE, BLOCK_IN_USE, BLOCK_SHARED,
                                       LiveView, block_states, pool_cells)

from test_block_manager import BS, compute, make_request


def reference_states(bm: BlockManager) -> list[int]:
    """The block states computed from the blocks themselves (the mirrors must agree)."""
    return [BLOCK_SHARED if b.ref_cnt > 1 else BLOCK_IN_USE if b.ref_cnt == 1
            else BLOCK_CACHED if b.block_hash is not None else BLOCK_FREE
            for b in bm.pool.blocks]


def test_block_states_follow_allocation_sharing_forks_frees_and_evictions():
    bm = BlockManager(num_blocks=12, block_size=BS)
    a = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    compute(bm, a, 10)
    assert list(block_states(bm.pool)) == reference_states(bm)
    assert list(block_states(bm.pool)[1:4]) == [BLOCK_IN_USE] * 3
    b = make_request("b", list(range(10)))  # same prompt: shares a's 2 full blocks
    hit = bm.get_computed_blocks(b)
    compute(bm, b, 2, hit.block_ids)
    states = block_states(bm.pool)
    assert list(states) == reference_states(bm)
    assert list(states[hit.block_ids]) == [BLOCK_SHARED] * 2
    bm.fork("b", ["b0", "b1", "b2"])
    assert list(block_states(bm.pool)) == reference_states(bm)
    bm.free(a)
    for child in ("b0", "b1", "b2"):
        bm.free(make_request(child, [1]))
    states = block_states(bm.pool)
    assert list(states) == reference_states(bm)
    assert set(states[hit.block_ids]) == {BLOCK_CACHED}  # freed, still reusable
    assert not np.isin(states, [BLOCK_IN_USE, BLOCK_SHARED]).any()
    c = make_request("c", list(range(100, 144)))  # 11 blocks: evicts every cached one
    compute(bm, c, 44)
    assert list(block_states(bm.pool)) == reference_states(bm)
    bm.free(c)
    assert bm.reset_prefix_cache()
    assert set(block_states(bm.pool)) == {BLOCK_FREE}


def test_pool_cells_one_digit_per_block_or_the_busiest_of_a_group():
    states = np.array([0, 0, 1, 2, 3, 0, 0], np.uint8)  # block 0 is left out
    assert pool_cells(states, max_cells=8) == ("012300", 1)
    assert pool_cells(states, max_cells=3) == ("130", 2)  # [0,1] [2,3] [0,0]
    assert pool_cells(states, max_cells=1) == ("3", 6)


def test_snapshot_counts_the_pool_and_lists_the_running_requests():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                          max_model_len=48, block_size=BS), num_blocks=16)
    scheduler.add_request(make_request("r", list(range(9))))
    scheduler.schedule()
    view = LiveView(interval_s=10.0)
    assert view.maybe_publish(scheduler, now=100.0)
    assert not view.maybe_publish(scheduler, now=105.0)  # within interval_s
    assert view.maybe_publish(scheduler, now=105.0, force=True)
    state = view.latest
    assert state["num_blocks"] == 15 and state["cells"] == "222" + "0" * 12
    assert state["counts"] == {"free": 12, "cached": 0, "in_use": 3, "shared": 0}
    assert state["num_running"] == 1 and state["num_waiting"] == 0
    assert state["running"] == [{"id": "r", "tokens": 9, "blocks": 3}]


def test_history_keeps_a_mean_per_second_for_the_last_minute():
    view = LiveView(history_s=60)
    for second, step_s, batch in ((0.1, 0.010, 2), (0.9, 0.030, 4), (1.5, 0.020, 8)):
        view.record_step(1000 + second, step_s, batch)
    assert view._history(1001.9) == [
        {"t": 1000, "steps": 2, "step_ms": pytest.approx(20.0), "batch": 3.0},
        {"t": 1001, "steps": 1, "step_ms": pytest.approx(20.0), "batch": 8.0}]
    view.record_step(1070.2, 0.005, 1)
    assert [h["t"] for h in view._history(1070.5)] == [1070]  # older than a minute: gone


def test_live_view_refuses_nonsense_settings():
    with pytest.raises(ValueError, match="interval_s"):
        LiveView(interval_s=-1)
