"""Forking and freeing a beam group's sequences after a step's selection, blocks shared.

A survivor extends a beam by one token whose K/V the next step writes. The first survivor of a
beam takes the beam's sequence over (its block table unchanged); every other survivor becomes a
new sequence whose block table shares the beam's full blocks (ref_cnt += 1) and gets a copy of
its partly filled last block (copy on write): the returned (source, destination) block pairs are
copied on the device before the next step. Beams without survivors are freed first, so their
last blocks pay for the copies (block_size 4, x = computed token, t = a survivor's new token)::

    beam a: [x x x x][x x . .]       survivors a+t1, a+t2; beam b has none
    a+t1:   [x x x x][x x t1 .]       a's own table
    a+t2:   [x x x x][x x t2 .]       first block shared (ref_cnt 2), second one copied

A beam whose last block is full shares all of it; its new token starts a block of its own.
"""

from __future__ import annotations

import copy

from jaxpaged.core.beam_group import Beam, BeamGroup, Survivor
from jaxpaged.core.block_manager import BlockManager, BlockTable
from jaxpaged.core.request import Request, RequestStatus
from jaxpaged.core.step_plan import StepPlan

BlockCopy = tuple[int, int]  # (source block id, destination block id)


def fork_beams(scheduler, group: BeamGroup, survivors: list[Survivor]) -> tuple[
        list[BlockCopy], set[str]]:
    """Applies a selection to the scheduler: frees the beams nobody extends, forks the others.

    Returns the block copies to run on the device and the ids of requests outside the group that
    were preempted to make room for the copies (their candidates are stale)."""
    by_parent: dict[str, list[Survivor]] = {}
    for survivor in survivors:
        by_parent.setdefault(survivor.parent.request.request_id, []).append(survivor)
    for beam in group.beams:
        if beam.request.request_id not in by_parent:
            scheduler._finish(beam.request, RequestStatus.FINISHED_ABORTED, None)
    copies: list[BlockCopy] = []
    preempted: set[str] = set()
    new_beams: dict[int, Beam] = {}  # survivor index -> its beam
    index_of = {id(s): i for i, s in enumerate(survivors)}
    for parent_id, children in by_parent.items():
        parent = children[0].parent.request
        for survivor in children[1:]:
            preempted |= _make_room(scheduler, group, parent)
            child = _clone(parent, group.new_beam_id())
            copy = share_table(scheduler.block_manager, parent, child)
            if copy is not None:
                copies.append(copy)
            child.append_output_token_id(survivor.token_id)
            scheduler.requests[child.request_id] = child
            scheduler.running.insert(scheduler.running.index(parent) + 1, child)
            new_beams[index_of[id(survivor)]] = Beam(child, survivor.cum_logprob, survivor.step)
        first = children[0]
        parent.append_output_token_id(first.token_id)
        parent.beam_seats = 0  # its group holds its seats through its beams now
        new_beams[index_of[id(first)]] = Beam(parent, first.cum_logprob, first.step)
    group.beams = [new_beams[i] for i in sorted(new_beams)]
    return copies, preempted


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
