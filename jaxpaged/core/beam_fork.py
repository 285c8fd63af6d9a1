"""Forking and freeing a beam group's sequences after a step's selection, blocks shared.

A survivor extends a beam by one token whose K/V the next step writes. The first survivor of a
beam takes the beam's sequence over (its block table unchanged). Every other survivor takes over
the sequence of a beam that has no survivor (its request, id and all, so the scheduler's and the
runner's per-request state stays put): that request gets the parent's tokens and a block table
sharing the parent's full blocks (ref_cnt += 1), its own full blocks are released, and its partly
filled last block receives a copy of the parent's (copy on write): the returned (source,
destination) block pairs are copied on the device before the next step. Only when no beam is left
to take over (the group's first step: one beam, ``beam_width`` survivors) is a new request made,
with a new block for its copy (block_size 4, x = computed token, t = a survivor's new token)::

    beam a: [x x x x][x x . .]       survivors a+t1, a+t2; beam b has none
    a+t1:   [x x x x][x x t1 .]       a's own table
    a+t2:   [x x x x][x x t2 .]       b's request: a's first block shared (ref_cnt 2), b's second
                                       block overwritten by a copy of a's

A beam whose last block is full shares all of it; its new token starts a block of its own.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

from jaxpaged.core.beam_group import Beam, BeamGroup, Survivor
from jaxpaged.core.block_manager import BlockManager, BlockTable
from jaxpaged.core.request import Request, RequestStatus
from jaxpaged.core.step_plan import StepPlan

BlockCopy = tuple[int, int]  # (source block id, destination block id)


class ForkResult(NamedTuple):
    """What a group's fork did (a NamedTuple: made for every group every step)."""

    copies: list[BlockCopy]  # block copies to run on the device before the next step
    # requests outside the group preempted to make room for the copies (candidates stale)
    preempted: set[str]
    added_ids: list[str]  # requests made for the group (beyond those taken over)
    removed_ids: list[str]  # the group's requests freed (nobody extends or takes them over)


def fork_beams(scheduler, group: BeamGroup, survivors: list[Survivor]) -> ForkResult:
    """Applies a selection to the scheduler: the beams nobody extends are taken over by the
    extra survivors (or freed), new requests are made for the rest."""
    firsts, extras = [], []  # (survivor index, survivor)
    seen = [False] * len(group.beams)  # has a survivor, by beam index
    for i, survivor in enumerate(survivors):
        (extras if seen[survivor.parent_index] else firsts).append((i, survivor))
        seen[survivor.parent_index] = True
    spare = [beam.request for beam, kept in zip(group.beams, seen) if not kept]
    added: list[str] = []
    copies: list[BlockCopy] = []
    preempted: set[str] = set()
    new_beams: list[Beam | None] = [None] * len(survivors)
    # extras first: they copy their parent's tokens before its first survivor appends its own
    for i, survivor in extras:
        parent = survivor.parent.request
        if spare:
            child = spare.pop()
            copy = take_over(scheduler.block_manager, parent, child)
        else:
            preempted |= _make_room(scheduler, group, parent)
            child = _clone(parent, group.new_beam_id())
            copy = share_table(scheduler.block_manager, parent, child)
            scheduler.requests[child.request_id] = child
            scheduler.running.insert(scheduler.running.index(parent) + 1, child)
            added.append(child.request_id)
        if copy is not None:
            copies.append(copy)
        child.append_output_token_id(survivor.token_id)
        new_beams[i] = Beam(child, survivor.cum_logprob, survivor.step)
    for request in spare:  # fewer survivors than beams (too few candidates)
        scheduler._finish(request, RequestStatus.FINISHED_ABORTED, None)
    for i, survivor in firsts:
        parent = survivor.parent.request
        parent.append_output_token_id(survivor.token_id)
        parent.beam_seats = 0  # its group holds its seats through its beams now
        new_beams[i] = Beam(parent, survivor.cum_logprob, survivor.step)
    group.beams = new_beams
    return ForkResult(copies, preempted, added, [r.request_id for r in spare])


def take_over(manager: BlockManager, parent: Request, child: Request) -> BlockCopy | None:
    """``child`` (a running beam of the same length that nobody extends) becomes a copy of
    ``parent``: its tokens, and a table sharing the parent's full computed blocks; its partly
    filled last block, if private, is overwritten by a copy of the parent's (returned as the copy
    to run), else a new one is taken (``child``'s blocks are released first, so one is free)."""
    if child.num_computed_tokens != parent.num_computed_tokens:
        raise ValueError(f"beam {child.request_id!r} has {child.num_computed_tokens} computed "
                         f"tokens, its new parent {parent.request_id!r} "
                         f"{parent.num_computed_tokens}: beams advance in lockstep")
    child.output_token_ids = list(parent.output_token_ids)
    child.all_token_ids = list(parent.all_token_ids)
    old = manager.tables[child.request_id]
    source = manager.tables[parent.request_id]
    bs, computed = manager.block_size, parent.num_computed_tokens
    num_full, partial = divmod(computed, bs)
    held = old.blocks
    # leading blocks both tables hold already (the prompt's, common ancestors'): compared by id,
    # a block's id being the block (the block ids are the tables' own lists)
    same = _common_prefix(old.block_ids, source.block_ids, min(num_full, len(held)))
    reuse = None
    if partial and len(held) == num_full + 1:
        last = held[num_full]
        if last.ref_cnt == 1 and last.block_hash is None:
            reuse = last
    manager.share_hashes(parent, child)  # its tokens are the parent's now
    if (same == num_full and len(held) == num_full + (partial > 0)
            and (reuse is not None or not partial)):
        # the child holds the parent's full blocks already (the beams parted in the last block,
        # the usual case): its table stays the same object, so the runner does not rewrite its
        # row, and nothing is shared or freed
        table = old
        copy = (source.block_ids[num_full], reuse.block_id) if partial else None
    else:
        full = source.blocks[:num_full]
        manager.pool.touch(full[same:])
        manager.pool.free_blocks(reversed([b for b in held[same:] if b is not reuse]))
        blocks = list(full)
        block_ids = source.block_ids[:num_full]  # the parent's ids of those blocks
        copy = None
        if partial:
            if reuse is None:
                (reuse,) = manager.pool.get_new_blocks(1)
            copy = (source.block_ids[num_full], reuse.block_id)
            blocks.append(reuse)
            block_ids.append(reuse.block_id)
        table = manager.tables[child.request_id] = BlockTable(blocks, block_ids, 0,
                                                              len(blocks) * bs, 0)
    manager._set_num_cached(table, min(source.num_cached, num_full))
    return copy


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading entries of ``a`` and ``b`` (at most ``limit``) are equal."""
    if a[:limit] == b[:limit]:  # one C-level comparison in the common case
        return limit
    same = 0
    while a[same] == b[same]:
        same += 1
    return same


def share_table(manager: BlockManager, parent: Request, child: Request) -> BlockCopy | None:
    """A table for ``child`` sharing ``parent``'s full computed blocks; a partly filled last
    block is copied into a new block (returned as a copy to run). Needs one free block then."""
    source = manager.tables[parent.request_id]
    bs, computed = manager.block_size, parent.num_computed_tokens
    full = source.blocks[:computed // bs]
    manager.pool.touch(full)
    blocks = list(full)
    copy = None
    if computed % bs:
        (new_block,) = manager.pool.get_new_blocks(1)
        copy = (source.blocks[computed // bs].block_id, new_block.block_id)
        blocks.append(new_block)
    table = BlockTable(blocks, [b.block_id for b in blocks], 0, len(blocks) * bs, 0)
    manager._set_num_cached(table, min(source.num_cached, len(full)))
    manager.tables[child.request_id] = table
    manager.share_hashes(parent, child)
    return copy


def _make_room(scheduler, group: BeamGroup, parent: Request) -> set[str]:
    """Preempts requests outside the group (latest first) until a block is free for a copy."""
    manager = scheduler.block_manager
    if parent.num_computed_tokens % manager.block_size == 0 or manager.num_free_blocks:
        return set()
    members = {id(b.request) for b in group.beams}
    plan = StepPlan(token_budget=0)
    for victim in reversed(list(scheduler.running)):
        if manager.num_free_blocks:
            break
        if id(victim) not in members and victim.status == RequestStatus.RUNNING:
            scheduler._preempt(victim, plan)
    if not manager.num_free_blocks:
        raise RuntimeError(f"no free KV block for a beam of {group.group_id!r}")
    return plan.preempted_req_ids


def _clone(parent: Request, request_id: str) -> Request:
    """A running copy of ``parent`` under a new id (its token lists copied, nothing else
    shared that changes). The parent was validated when it was made: the copy is not again (it
    costs as much as the fork itself)."""
    child = copy.copy(parent)
    child.request_id = request_id
    child.output_token_ids = list(parent.output_token_ids)
    child.all_token_ids = list(parent.all_token_ids)
    child.status = RequestStatus.RUNNING
    child.num_preemptions = 0
    child.num_output_placeholders = 0
    child.beam_seats = 0
    child.stop_reason = None
    return child
