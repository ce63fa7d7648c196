"""Shared matcher for the two per-layer sites: an all-reduce after a row-parallel linear.

Matches: ``wait(all_reduce(rowlinear(region(collinear_1(x), ..., collinear_k(x))), "sum"))``
Replaces with: ``rowlinear(...)`` itself; the linears' weights become full (attention-DP).
The caller decides, from what the region contains, which block it is.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from adp_pass.fx_vocab import ALL_REDUCE_OPS, is_op, through_views, wait_of
from adp_pass.plan import ShardedWeight, Site
from adp_pass.patterns.structure import BlockRegion, block_region, fused_segments, producer_matmul


def match_block_allreduce(
    collective: fx.Node, kind: str, is_block: Callable[[BlockRegion], bool]
) -> Site | None:
    if not is_op(collective, ALL_REDUCE_OPS) or collective.args[1] != "sum":
        return None  # not a TP partial-sum reduction
    row = producer_matmul(collective.args[0])
    if row is None:
        return None  # the reduced value is not a linear layer's output
    region = block_region(row.activation)
    if not region.input_matmuls or not is_block(region):
        return None
    weights = [ShardedWeight(row.weight.target, "row", row.weight_in_dim)]
    for column in region.input_matmuls:
        segments = fused_segments(column)
        weights.append(
            ShardedWeight(column.weight.target, "column", column.weight_out_dim, segments)
        )
        if column.bias is not None:
            weights.append(ShardedWeight(column.bias.target, "column", 0, segments))
    wait = wait_of(collective)
    inputs = {through_views(column.activation) for column in region.input_matmuls}
    return Site(
        kind=kind,
        collective=collective.name,
        wait=wait.name if wait is not None else None,
        group=str(collective.args[2]),
        producer=row.node.name,
        replaced=(wait or collective).name,
        replacement=collective.args[0].name,
        weights=tuple(weights),
        block_input=inputs.pop().name if len(inputs) == 1 else None,
    )
