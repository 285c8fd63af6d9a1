"""BlockManager / BlockPool: null block, ref counts, eviction order, prefix caching, forks."""

import pytest

from jaxpaged.core.block_manager import BlockManager, BlockPool, hash_block_tokens
from jaxpaged.core.request import Request
from jaxpaged.sampling_params import SamplingParams

BS = 4


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(), arrival_time=0.0)


def compute(bm: BlockManager, request: Request, num_new_tokens: int, hits=()) -> list[int]:
    """Allocate, mark the tokens computed and cache full blocks (what a step does)."""
    new_ids = bm.allocate_slots(request, num_new_tokens, hits)
    assert new_ids is not None
    request.num_computed_tokens += len(hits) * BS + num_new_tokens
    bm.cache_full_blocks(request)
    return new_ids


def test_null_block_is_never_allocated_and_exhaustion_allocates_nothing():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(13)))  # 13 tokens -> 4 blocks
    assert bm.allocate_slots(a, 13) == [1, 2, 3, 4]
    b = make_request("b", list(range(100, 109)))  # 9 tokens -> 3 blocks, only 1 left
    assert bm.allocate_slots(b, 9) is None
    assert bm.num_free_blocks == 1 and bm.get_block_ids("b") == []
    assert bm.allocate_slots(b, 4) == [5]
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    assert 0 not in bm.get_block_ids("a") + bm.get_block_ids("b")


def test_blocks_grow_only_at_block_boundaries():
    bm = BlockManager(num_blocks=10, block_size=BS)
    r = make_request("r", list(range(6)))
    assert len(compute(bm, r, 6)) == 2  # tokens 0..5 -> 2 blocks
    for num_tokens in range(7, 14):  # decode one token at a time
        r.append_output_token_ids(50 + num_tokens)
        new = compute(bm, r, 1)
        assert len(new) == (1 if (num_tokens - 1) % BS == 0 else 0), num_tokens
        assert len(bm.get_block_ids("r")) == -(-num_tokens // BS)


def test_free_returns_blocks_tail_first_and_allocation_reuses_from_the_head():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(12)))
    b = make_request("b", list(range(20, 28)))
    assert bm.allocate_slots(a, 12) == [1, 2, 3]
    assert bm.allocate_slots(b, 8) == [4, 5]
    assert bm.pool.free_block_ids() == [6, 7]
    bm.free(a)
    assert bm.pool.free_block_ids() == [6, 7, 3, 2, 1]
    bm.free(b)
    assert bm.pool.free_block_ids() == [6, 7, 3, 2, 1, 5, 4]
    c = make_request("c", list(range(40, 52)))
    assert bm.allocate_slots(c, 12) == [6, 7, 3]
    assert bm.num_free_blocks == 4 and bm.usage == pytest.approx(3 / 7)


def test_prefix_hit_never_covers_the_whole_prompt():
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = make_request("first", list(range(12)))  # exactly 3 full blocks
    compute(bm, first, 12)
    same = make_request("same", list(range(12)))
    hit = bm.get_computed_blocks(same)
    assert hit.num_computed_tokens == 8  # 2 blocks: the last token must be computed
    assert hit.block_ids == bm.get_block_ids("first")[:2]
    longer = make_request("longer", list(range(12)) + [99])
    hit = bm.get_computed_blocks(longer)
    assert (hit.num_computed_tokens, hit.block_ids) == (12, bm.get_block_ids("first"))
    diverging = make_request("diverging", list(range(6)) + [77] * 6)
    assert bm.get_computed_blocks(diverging).num_computed_tokens == 4


def test_prefix_hits_share_blocks_and_count_references():
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = make_request("first", list(range(10)))
    compute(bm, first, 10)
    second = make_request("second", list(range(8)) + [50, 51, 52])
    hit = bm.get_computed_blocks(second)
    assert hit.num_computed_tokens == 8
    free_before = bm.num_free_blocks
    new = bm.allocate_slots(second, 3, hit.block_ids)
    assert len(new) == 1 and bm.num_free_blocks == free_before - 1
    shared = bm.get_block_ids("first")[:2]
    assert bm.get_block_ids("second") == shared + new
    assert [bm.ref_count(b) for b in shared] == [2, 2]
    bm.free(first)
    assert [bm.ref_count(b) for b in shared] == [1, 1]
    bm.free(second)
    assert bm.num_free_blocks == 15 and all(bm.ref_count(b) == 0 for b in range(16))


def test_freed_cached_blocks_are_reused_until_evicted():
    bm = BlockManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    a = make_request("a", list(range(9)))
    compute(bm, a, 9)  # blocks 1, 2 full and cached, 3 partial
    bm.free(a)  # free queue: 4, 3, 2, 1
    again = make_request("again", list(range(9)))
    hit = bm.get_computed_blocks(again)
    assert hit.block_ids == [1, 2]
    assert bm.allocate_slots(again, 1, hit.block_ids) == [4]  # hits leave the free queue
    assert bm.pool.free_block_ids() == [3]
    bm.free(again)
    # Evict: a 4-block request takes every free block, oldest-freed first; hashes are dropped.
    other = make_request("other", list(range(50, 66)))
    assert bm.allocate_slots(other, 16) == [3, 4, 2, 1]
    bm.free(other)
    assert bm.get_computed_blocks(make_request("late", list(range(9)))).block_ids == []


def test_free_hits_count_against_the_free_pool():
    bm = BlockManager(num_blocks=4, block_size=BS)  # 3 usable blocks
    a = make_request("a", list(range(9)))
    compute(bm, a, 9)
    bm.free(a)  # all 3 free, blocks 1 and 2 cached
    b = make_request("b", list(range(8)) + list(range(60, 68)))  # 16 tokens: 2 hits + 2 new
    hit = bm.get_computed_blocks(b)
    assert hit.num_computed_tokens == 8
    assert bm.allocate_slots(b, 8, hit.block_ids) is None  # needs 4 of 3 blocks
    assert bm.num_free_blocks == 3 and bm.ref_count(1) == 0
    assert bm.allocate_slots(b, 4, hit.block_ids) == [3]


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(12)))
    compute(bm, a, 12)
    assert all(bm.pool.blocks[b].block_hash is None for b in bm.get_block_ids("a"))
    assert bm.get_computed_blocks(make_request("b", list(range(13)))) == ([], 0)


def test_only_computed_full_blocks_are_cached():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_request("a", list(range(10)))
    assert bm.allocate_slots(a, 10) == [1, 2, 3]
    bm.cache_full_blocks(a)  # nothing computed yet
    assert all(bm.pool.blocks[b].block_hash is None for b in (1, 2, 3))
    a.num_computed_tokens = 6
    bm.cache_full_blocks(a)
    assert [bm.pool.blocks[b].block_hash is not None for b in (1, 2, 3)] == [True, False, False]
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    assert [bm.pool.blocks[b].block_hash is not None for b in (1, 2, 3)] == [True, True, False]


def test_hashes_chain_over_the_prefix():
    block = [5, 6, 7, 8]
    root = hash_block_tokens(None, block)
    assert root == hash_block_tokens(None, list(block))  # stable, not id-based
    assert hash_block_tokens(root, block) != root
    assert hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 4]), block) != hash_block_tokens(
        hash_block_tokens(None, [1, 2, 3, 9]), block
    )
    # Same last block after different prefixes must not hit.
    bm = BlockManager(num_blocks=16, block_size=BS)
    compute(bm, make_request("a", [1, 2, 3, 4] + block + [0]), 9)
    assert bm.get_computed_blocks(make_request("b", [1, 2, 3, 9] + block + [0])).block_ids == []


def test_duplicate_content_keeps_one_cached_copy():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a, b = make_request("a", list(range(5))), make_request("b", list(range(5)))
    bm.allocate_slots(a, 5)
    bm.allocate_slots(b, 5)  # computed in the same step: no hit possible
    for r in (a, b):
        r.num_computed_tokens = 5
        bm.cache_full_blocks(r)
    hashed = [bm.pool.blocks[i].block_hash is not None for i in (1, 3)]
    assert hashed == [True, False]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 15


def test_fork_shares_the_parent_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    parent = make_request("p", list(range(10)))
    compute(bm, parent, 8)
    shared = bm.get_block_ids("p")
    bm.fork("p", ["p-0", "p-1", "p-2"])
    assert bm.get_block_ids("p") == []
    assert all(bm.get_block_ids(f"p-{i}") == shared for i in range(3))
    assert [bm.ref_count(b) for b in shared] == [3, 3]
    assert bm.num_free_blocks == 15 - 2
    with pytest.raises(ValueError, match="p-0"):
        bm.fork("p-1", ["p-0"])
    for i in range(3):
        bm.free(make_request(f"p-{i}", [0]))
    assert bm.num_free_blocks == 15 and all(bm.ref_count(b) == 0 for b in shared)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
    bm = BlockManager(num_blocks=8, block_size=BS)
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.allocate_slots(make_request("a", [1]), -1)
    with pytest.raises(ValueError, match="holds no blocks"):
        bm.fork("nobody", ["x"])


def test_reset_prefix_cache_only_when_idle():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    compute(bm, a, 9)
    assert not bm.reset_prefix_cache()
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.get_computed_blocks(make_request("b", list(range(9)))).block_ids == []


def test_cache_salt_shares_blocks_only_under_the_same_salt():
    """vLLM's cache_salt: another salt (or none) finds nothing; the same salt hits, and forks
    keep the salt."""
    bm = BlockManager(num_blocks=20, block_size=BS)
    tokens = list(range(9))
    first = Request("a", tokens, SamplingParams(), arrival_time=0.0, cache_salt="alice")
    compute(bm, first, 9)
    for salt in ("bob", None):
        other = Request(f"x-{salt}", tokens, SamplingParams(), arrival_time=0.0, cache_salt=salt)
        assert bm.get_computed_blocks(other).num_computed_tokens == 0
    same = Request("b", tokens, SamplingParams(n=2), arrival_time=0.0, cache_salt="alice")
    assert bm.get_computed_blocks(same).num_computed_tokens == 8
    assert same.make_child(1).cache_salt == "alice"
    with pytest.raises(ValueError, match="cache_salt"):
        Request("c", tokens, SamplingParams(), cache_salt="")


def test_shared_hashes_are_the_childs_own():
    """A beam taken over gets a copy of its parent's tokens and memoised block hashes: the blocks
    it caches next hash exactly as if it had hashed its tokens itself, and the memo it took is
    its own (the parent's growing list is not shared); an unknown parent shares nothing."""
    bm = BlockManager(num_blocks=20, block_size=BS)
    parent = make_request("p", list(range(10)))
    compute(bm, parent, 10)  # 2 full blocks cached, hashes memoised
    child = make_request("c", [50, 51])
    child.all_token_ids = list(parent.all_token_ids)
    bm.share_hashes(parent, child)
    parent.all_token_ids += [20, 21]  # the parent's block 2 fills with other tokens than the child's
    bm._block_hashes(parent, 3)
    child.all_token_ids += [30, 31]
    expected = BlockManager(num_blocks=20, block_size=BS)._block_hashes(
        make_request("fresh", child.all_token_ids), 3)
    assert bm._block_hashes(child, 3) == expected
    stranger = make_request("s", [1, 2, 3, 4])
    bm.share_hashes(make_request("unknown", [1]), stranger)
    assert bm._block_hashes(stranger, 1) == [hash_block_tokens(None, [1, 2, 3, 4])]
