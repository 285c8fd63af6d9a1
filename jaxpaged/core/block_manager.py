"""The host-side KV block pool: allocation, ref counts, eviction order and prefix caching.

vLLM v1's ``BlockPool`` + ``KVCacheManager`` at nano-vllm size. The device KV cache is one pool of
``num_blocks`` blocks of ``block_size`` token slots; token ``i`` of a request lives in slot
``i % block_size`` of block ``block_ids[i // block_size]``. Block 0 is the *null block*: never
allocated, it pads block tables.

Prefix caching: once a block is full and its K/V are computed, it gets a hash chained over the
whole prefix, ``hash(parent_block_hash, tokens_of_block)``, and is entered in a hash -> block map.
A new request whose leading full blocks hash the same reuses those blocks (ref_cnt += 1) instead of
recomputing them. Freed blocks (ref_cnt 0) keep their hash and stay reusable until the allocator
evicts them from the head of the free queue (least recently freed first).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from jaxpaged.core.request import Request

BlockHash = bytes  # sha256 digest of (parent block hash, token ids of the block)


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained, process-independent hash of one full block (``parent_hash`` None for block 0, or
    the request's ``salt_hash`` when it has a cache salt)."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids))  # the array's buffer: no bytes copy
    return digest.digest()


def salt_hash(cache_salt: str | None) -> BlockHash | None:
    """The parent hash of a salted request's first block (vLLM's ``cache_salt``): a different salt
    chains every block hash differently, so requests share cached blocks only under one salt."""
    if cache_salt is None:
        return None
    return hashlib.sha256(b"jaxpaged-cache-salt\0" + cache_salt.encode()).digest()


@dataclasses.dataclass(eq=False)
class KVCacheBlock:
    block_id: int  # index into the device pool
    ref_cnt: int = 0  # live requests whose block table holds this block
    block_hash: BlockHash | None = None  # set while the block is in the prefix cache


class BlockPool:
    """All blocks, the free queue in eviction order, and the prefix-cache map."""

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(
                f"num_blocks must be an int >= 2 (block 0 is the null block), got {num_blocks!r}."
            )
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]  # [num_blocks]
        # NOTE: an OrderedDict is a doubly linked list with O(1) removal from the middle, which a
        # prefix-cache hit on a free block needs. Head = next to evict; freed blocks go to the tail.
        self._free: collections.OrderedDict[int, KVCacheBlock] = collections.OrderedDict(
            (b.block_id, b) for b in self.blocks[1:]
        )
        self._cached: dict[BlockHash, KVCacheBlock] = {}
        # NOTE: flat mirrors of every block's ref_cnt and "has a hash" (contiguous C arrays that
        # numpy can view without a copy), kept in step with the blocks by every method that
        # changes them, so that a reader (the server's live view) sees the whole pool with no
        # Python loop over the blocks. Read-only outside this class.
        self.ref_cnts = array("i", [0]) * num_blocks  # [num_blocks]
        self.hashed = array("B", [0]) * num_blocks  # [num_blocks] 1 while in the prefix cache

    def add_refs(self, blocks: Iterable[KVCacheBlock], count: int) -> None:
        """``count`` more references on blocks already in use (forks share a parent's blocks)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} is free; it cannot be shared")
            block.ref_cnt += count
            self.ref_cnts[block.block_id] = block.ref_cnt

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free, including cached-but-unused ones)."""
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (first = evicted first)."""
        return list(self._free)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > len(self._free):
            raise ValueError(f"cannot allocate {num_blocks} blocks: {len(self._free)} are free")
        new_blocks = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            self.ref_cnts[block.block_id] = 1
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take one more reference on prefix-cache hits (pulling free ones out of the queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
            self.ref_cnts[block.block_id] = block.ref_cnt

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the free queue's tail in this order."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than allocated")
            block.ref_cnt -= 1
            self.ref_cnts[block.block_id] = block.ref_cnt
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self._cached.get(block_hash)

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Enter a full, computed block in the prefix cache (no-op if it or its hash already is)."""
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block
            self.hashed[block.block_id] = 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed while no block is in use (returns success)."""
        if len(self._free) != len(self.blocks) - 1:
            return False
        for block in self.blocks:
            self._evict(block)
        return True

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
            self.hashed[block.block_id] = 0


@dataclasses.dataclass(slots=True, eq=False)
class BlockTable:
    """One request's blocks, as the manager keeps them. Read-only outside ``BlockManager``.

    ``num_slots`` and ``cache_from`` let a caller's per-step loop skip ``allocate_slots`` and
    ``cache_full_blocks`` when they would do nothing (the steady decode step).
    """

    blocks: list[KVCacheBlock]  # [num_blocks] in table order
    # NOTE: replaced, never mutated, when the table changes, so a list handed out stays a valid
    # snapshot and an unchanged table is the very same object from step to step (the runner
    # skips unchanged rows).
    block_ids: list[int]  # [num_blocks]
    num_cached: int  # leading blocks already offered to the prefix cache
    num_slots: int  # len(blocks) * block_size: the tokens the table can hold
    # num_computed_tokens from which a block beyond the first num_cached is full; never reached
    # when prefix caching is off
    cache_from: int


_NEVER = 1 << 62  # BlockTable.cache_from without prefix caching


class PrefixHit(NamedTuple):
    block_ids: list[int]  # cached blocks holding the request's leading full blocks
    num_computed_tokens: int  # len(block_ids) * block_size


class BlockManager:
    """Per-request block tables over one ``BlockPool`` (vLLM's ``KVCacheManager``)."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        # request id -> its block table, for requests holding blocks (or admitted with none).
        # Read-only outside the manager; hot loops read it directly instead of calling methods.
        self.tables: dict[str, BlockTable] = {}
        # request id -> (the request, hashes of its leading full blocks so far). A request's tokens
        # only grow, so its block hashes are computed once each, whether by a prefix-cache lookup
        # (every step a waiting request is retried) or by caching its computed blocks.
        self._req_hashes: dict[str, tuple[Request, list[BlockHash]]] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks (all but the null block) held by live requests."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table ids (a snapshot: the manager never mutates it; nor may you)."""
        table = self.tables.get(request_id)
        return table.block_ids if table is not None else []

    def ref_count(self, block_id: int) -> int:
        return self.pool.blocks[block_id].ref_cnt

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> PrefixHit:
        """The longest run of the request's leading full blocks found in the prefix cache.

        NOTE: never the whole request: at least its last token must be computed so the step yields
        logits to sample from, so only blocks inside the first ``num_tokens - 1`` tokens count;
        and a request still owed prompt logprobs only reuses positions it has already reported
        (``Request.max_prefix_cache_tokens``). Its own blocks are still published to the cache.
        """
        if not self.enable_prefix_caching:
            return PrefixHit([], 0)
        hits: list[int] = []
        for i in range(request.max_prefix_cache_tokens // self.block_size):
            block = self.pool.get_cached_block(self._block_hashes(request, i + 1)[i])
            if block is None:
                break
            hits.append(block.block_id)
        return PrefixHit(hits, len(hits) * self.block_size)

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """Hashes of (at least) the request's first ``num_blocks`` full blocks, memoised."""
        entry = self._req_hashes.get(request.request_id)
        if entry is None or entry[0] is not request:  # a new request under a reused id
            entry = self._req_hashes[request.request_id] = (request, [])
        hashes = entry[1]
        if len(hashes) < num_blocks:
            bs, tokens = self.block_size, request.all_token_ids
            for i in range(len(hashes), num_blocks):
                parent = hashes[-1] if i else salt_hash(request.cache_salt)
                hashes.append(hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs]))
        return hashes

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Give the request enough blocks for ``num_new_tokens`` more tokens.

        ``new_computed_blocks`` are prefix-cache hits from ``get_computed_blocks`` (only for a
        request that holds no blocks yet); they are shared, not copied. Returns the ids of the newly
        allocated blocks (possibly ``[]``), or ``None`` when the pool cannot fit them, in which case
        nothing is allocated. Block tables (block_size 4; x = token already in the cache,
        n = new token, . = free slot; each [....] is one block)::

            admission with 2 cache hits, num_new_tokens=5:
                [x x x x][x x x x][n n n n][n . . .]
                 hit      hit      new      new      2 hits touched, 2 blocks allocated
            running, num_computed_tokens=6, num_new_tokens=3:
                [x x x x][x x n n][n . . .]
                 held     held     new               1 block allocated
            next decode step, num_computed_tokens=9, num_new_tokens=1:
                [x x x x][x x x x][x n . .]          nothing allocated (returns [])
        """
        if not isinstance(num_new_tokens, int) or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be a non-negative int, got {num_new_tokens!r}")
        rid = request.request_id
        table = self.tables.get(rid)
        if table is not None and table.blocks and not new_computed_blocks and (
                request.num_computed_tokens + num_new_tokens <= table.num_slots):
            return []  # the common decode step: the last block still has room
        held = table.blocks if table is not None else []
        if held and new_computed_blocks:
            raise ValueError(f"request {rid!r} already holds blocks; no cache hits")
        hits = [self.pool.blocks[i] for i in new_computed_blocks]
        num_tokens = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_needed = max(0, self.num_blocks_for(num_tokens) - len(held) - len(hits))
        # Hits that sit in the free queue stop being allocatable once touched.
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed + num_free_hits > self.pool.num_free_blocks:
            return None
        self.pool.touch(hits)
        new_blocks = self.pool.get_new_blocks(num_needed)
        if table is None:  # hits are in the cache already
            table = self.tables[rid] = BlockTable(held, [], 0, 0, 0)
            self._set_num_cached(table, len(hits))
        held.extend(hits)
        held.extend(new_blocks)
        added = [b.block_id for b in hits] + [b.block_id for b in new_blocks]
        table.block_ids = table.block_ids + added
        table.num_slots = len(held) * self.block_size
        return added[len(hits):]

    def cache_full_blocks(self, request: Request) -> None:
        """Enter the request's full blocks among its first ``num_computed_tokens`` in the cache.

        Call only once those tokens' K/V have been written (after the step that computed them):
        another request may read a cached block as soon as it is in the map.
        """
        table = self.tables.get(request.request_id)  # None: holds no blocks
        if table is None or request.num_computed_tokens < table.cache_from:
            return  # the common decode step: no block filled up (or no prefix caching)
        first, blocks = table.num_cached, table.blocks
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        if first >= num_full:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(first, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._set_num_cached(table, num_full)

    def _set_num_cached(self, table: BlockTable, num_cached: int) -> None:
        table.num_cached = num_cached
        table.cache_from = ((num_cached + 1) * self.block_size if self.enable_prefix_caching
                            else _NEVER)

    def fork(self, parent_id: str, child_ids: Sequence[str]) -> None:
        """Hand the parent's blocks to its children, shared (each block's ref_cnt += n - 1)."""
        if parent_id not in self.tables:
            raise ValueError(f"request {parent_id!r} holds no blocks to fork")
        if not child_ids:
            raise ValueError(f"fork of {parent_id!r} needs at least one child id")
        for child_id in child_ids:
            if child_id in self.tables:
                raise ValueError(f"request {child_id!r} already holds blocks")
        parent = self.tables.pop(parent_id)
        self._req_hashes.pop(parent_id, None)
        for child_id in child_ids:  # block_ids is shared: it is never mutated
            self.tables[child_id] = dataclasses.replace(parent, blocks=list(parent.blocks))
        self.pool.add_refs(parent.blocks, len(child_ids) - 1)

    def free(self, request: Request) -> None:
        """Release the request's blocks and forget its hashes (a no-op if it holds none)."""
        table = self.tables.pop(request.request_id, None)
        self._req_hashes.pop(request.request_id, None)
        if table is not None:
            # NOTE: tail blocks first, so they are evicted before the request's shared prefix.
            self.pool.free_blocks(reversed(table.blocks))

    def share_hashes(self, parent: Request, child: Request) -> None:
        """``child``'s tokens were replaced by a copy of ``parent``'s (a beam taken over or
        cloned): it takes a copy of the parent's memoised block hashes (same tokens, same
        hashes), so caching its next full block hashes that block only."""
        entry = self._req_hashes.get(parent.request_id)
        if entry is None or entry[0] is not parent:
            self._req_hashes.pop(child.request_id, None)
        else:
            self._req_hashes[child.request_id] = (child, list(entry[1]))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
