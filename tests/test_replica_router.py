"""The replica router (fewest outstanding tokens, prefix affinity), the merged /metrics and the
missing-Ray message: plain Python, no Ray cluster."""

from __future__ import annotations

import sys

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from jaxpaged.distributed.metrics import merge_replica_metrics
from jaxpaged.distributed.router import AFFINITY_BLOCKS, Router, prefix_keys

BLOCK = 4


def test_fewest_outstanding_tokens_wins_and_release_gives_them_back():
    router = Router(3, BLOCK, slack_tokens=0)
    first = router.place([1, 2], 100, serving=[0, 1, 2])
    second = router.place([3, 4], 50, serving=[0, 1, 2])
    third = router.place([5, 6], 10, serving=[0, 1, 2])
    assert (first.replica, second.replica, third.replica) == (0, 1, 2)
    assert router.place([7, 8], 1, serving=[0, 1, 2]).replica == 2  # 10 + 0 < 50 < 100
    router.release(0, 100)
    assert router.outstanding == [0, 50, 11]
    assert router.place([9], 1, serving=[1, 2]).replica == 2  # 0 does not serve
    assert router.place([9], 1, serving=[]) is None


def test_a_shared_prefix_goes_back_to_its_replica_within_the_slack():
    router = Router(2, BLOCK, slack_tokens=100)
    prefix = list(range(2 * BLOCK))
    home = router.place(prefix + [90], 50, serving=[0, 1]).replica
    other = router.place([77] * 9, 10, serving=[0, 1]).replica
    assert other != home
    # the home replica is 40 tokens busier, within the slack: the shared prefix goes there
    assert router.place(prefix + [91, 92], 30, serving=[0, 1]).replica == home
    # beyond the slack, the least loaded replica takes it (and becomes the prefix's home)
    router.outstanding[home] += 500
    assert router.place(prefix + [93], 5, serving=[0, 1]).replica == other
    assert router.place(prefix + [94], 5, serving=[0, 1]).replica == other
    router.outstanding[home] -= 500
    router.outstanding[other] = router.outstanding[home] + 50  # within the slack of home
    router.forget(other)  # it died: its blocks are gone, so the least loaded takes the prefix
    assert router.place(prefix + [95], 5, serving=[0, 1]).replica == home


def test_prefix_keys_chain_whole_blocks_and_the_salt():
    ids = list(range(10 * BLOCK))
    keys = prefix_keys(ids, BLOCK)
    assert len(keys) == AFFINITY_BLOCKS
    assert prefix_keys(ids[:BLOCK * 2 + 1], BLOCK) == keys[:2]  # a partial block is not hashed
    assert prefix_keys(ids[:BLOCK - 1], BLOCK) == ()
    assert prefix_keys(ids, BLOCK, salt="tenant-a") != keys
    changed = [99] + ids[1:]
    assert set(prefix_keys(changed, BLOCK)).isdisjoint(keys)  # block 0 is in every key


def _replica_text(success: int) -> bytes:
    registry = CollectorRegistry()
    counter = Counter("vllm:request_success", "Requests that finished.",
                      ["model_name", "finished_reason"], registry=registry)
    counter.labels("tiny", "stop").inc(success)
    return generate_latest(registry)


def test_merged_metrics_label_every_replica():
    front = CollectorRegistry()
    Counter("jaxpaged:replica_restarts", "Restarts.", ["replica"], registry=front).labels("1").inc()
    text = merge_replica_metrics([(0, _replica_text(3)), (1, _replica_text(5))], front).decode()
    lines = [line for line in text.splitlines() if line.startswith("vllm:request_success_total")]
    assert sorted(lines) == [
        'vllm:request_success_total{finished_reason="stop",model_name="tiny",replica="0"} 3.0',
        'vllm:request_success_total{finished_reason="stop",model_name="tiny",replica="1"} 5.0']
    assert text.count("# TYPE vllm:request_success_total counter") == 1  # one family
    assert 'jaxpaged:replica_restarts_total{replica="1"} 1.0' in text


def test_without_ray_the_flag_says_how_to_get_it(monkeypatch):
    from jaxpaged.distributed.options import ReplicaOptions
    from jaxpaged.distributed.serve import init_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    with pytest.raises(ImportError, match=r'--data-parallel-size above 1 needs Ray, which is '
                                          r'not installed: pip install "jaxpaged\[ray\]"'):
        init_ray(ReplicaOptions(2))


def test_serve_without_ray_says_how_to_get_it_before_loading_anything(monkeypatch, capsys):
    from jaxpaged.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    status = main(["serve", "/no/such/model", "--data-parallel-size", "2"])
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        'jaxpaged serve: error: --data-parallel-size above 1 needs Ray, which is not '
        'installed: pip install "jaxpaged[ray]"')
