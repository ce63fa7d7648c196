"""Column-parallel LM head all-gather.

Matches: ``cat(chunk(wait(all_gather_into_tensor(linear(x))), dim=0), dim=-1)``: each rank's
logits for its vocab columns gathered rank-major, then laid side by side.
Replaces with: the linear's output, with the full vocab weight.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from adp_pass.fx_vocab import (
    ALL_GATHER_OPS,
    SPLIT_OPS,
    VIEW_OPS,
    dim_arg,
    is_last_dim,
    is_op,
    wait_of,
)
from adp_pass.plan import ShardedWeight, Site
from adp_pass.patterns.structure import producer_matmul

KIND = "lm_head_gather"
aten = torch.ops.aten
# How the gathered rank blocks are cut apart on their way to the joining cat.
_REARRANGE_OPS = VIEW_OPS | SPLIT_OPS | {aten.chunk.default}


def _joining_cat(start: fx.Node) -> fx.Node | None:
    """The cat that lays the gathered rank blocks side by side along the last dim."""
    stack, seen = list(start.users), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_op(node, {aten.cat.default}):
            return node if is_last_dim(dim_arg(node, 1), node.meta["val"].dim()) else None
        if is_op(node, _REARRANGE_OPS | {operator.getitem}):
            stack.extend(node.users)
    return None


def match(collective: fx.Node) -> Site | None:
    if not is_op(collective, ALL_GATHER_OPS):
        return None
    head = producer_matmul(collective.args[0])
    wait = wait_of(collective)
    if head is None or wait is None:
        return None
    cat = _joining_cat(wait)
    if cat is None:
        return None
    local = head.node.meta["val"].shape[-1]
    return Site(
        kind=KIND,
        collective=collective.name,
        wait=wait.name,
        group=str(collective.args[2]),
        producer=head.node.name,
        replaced=cat.name,
        replacement=collective.args[0].name,
        weights=(ShardedWeight(head.weight.target, "column", head.weight_out_dim, (int(local),)),),
    )
