"""The process groups a mapping needs, created on the real job, and bound into a rank's graph.

A rewritten graph names its collectives' groups by *tag* (``node.meta["adp_group"]``):
``"world"`` (the TP job's collectives, kept as captured), ``"attn"`` (ranks sharing one
request set and its attention heads), ``"mlp"`` (ranks sharing the MLP columns). The graph
is built before its rank joins the job (traced on a fake group), so the group names it holds
mean nothing on the real job until :func:`bind_groups` writes the real ones in.

Ranks whose forward calls meet in some collective must step together: the *lockstep* group
(consecutive ranks, ``Mapping.lockstep_size`` of them) gets a gloo group of its own, so the
engine agrees on each step's shapes on the CPU without touching the GPU stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
import torch.fx as fx

from adp_pass.mapping import Mapping
from adp_pass.fx_vocab import COLLECTIVE_OPS, is_op

from adp_pass.plan import GROUP_TAG


@dataclass
class RankGroups:
    names: dict[str, str]  # tag -> the real group's name, for this rank
    lockstep: dist.ProcessGroup | None  # gloo group of the ranks that step together
    lockstep_ranks: list[int]


def _blocks(world: int, size: int) -> list[list[int]]:
    return [list(range(start, start + size)) for start in range(0, world, size)]


def create_groups(mapping: Mapping) -> RankGroups:
    """Create every group the mapping needs (collective: every rank calls this, same order)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != mapping.world_size:
        raise ValueError(f"the job has {world} ranks but the mapping says world={mapping.world_size}")
    names = {"world": dist.group.WORLD.group_name}
    for tag, size in (("attn", mapping.attn_tp_size), ("mlp", mapping.mlp_tp_size)):
        for ranks in _blocks(world, size):
            group = dist.new_group(ranks) if size < world else dist.group.WORLD
            if rank in ranks:
                names[tag] = group.group_name
    lockstep, lockstep_ranks = None, [rank]
    size = mapping.lockstep_size
    if size > 1:
        for ranks in _blocks(world, size):
            group = dist.new_group(ranks, backend="gloo")
            if rank in ranks:
                lockstep, lockstep_ranks = group, ranks
    return RankGroups(names, lockstep, lockstep_ranks)


def bind_groups(gm: fx.GraphModule, names: dict[str, str]) -> int:
    """Point every collective of ``gm`` at the real group its tag names; returns how many.
    The group name is the last positional argument of every functional collective."""
    count = 0
    for node in gm.graph.nodes:
        if not is_op(node, COLLECTIVE_OPS):
            continue
        tag = node.meta.get(GROUP_TAG)
        if tag is None:
            raise KeyError(f"collective {node.name} has no group tag: only a rewritten graph "
                           "(adp_pass.rewrite) can be bound to the job's groups")
        if tag not in names:
            raise KeyError(f"collective {node.name} needs group {tag!r}; created: {sorted(names)}")
        args = list(node.args)
        args[-1] = names[tag]
        node.args = tuple(args)
        count += 1
    if count:
        gm.recompile()
    return count
