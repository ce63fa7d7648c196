"""Vocab-parallel embedding all-reduce.

Matches: an all-reduce whose input is an embedding lookup in a row shard of the table, with no
linear layer in between (the ids outside the shard are masked to zero before the reduce).
Replaces with: a lookup of the raw token ids in the full table; the masking becomes dead code.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from adp_pass.fx_vocab import ALL_REDUCE_OPS, EMBEDDING_OPS, attr_source, is_op, wait_of
from adp_pass.plan import ShardedWeight, Site
from adp_pass.patterns.structure import block_region

KIND = "embedding"


def _token_ids(indices: fx.Node) -> fx.Node | None:
    """The integer graph input the (shifted, masked) indices are computed from."""
    seen, stack, found = set(), [indices], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and not val.is_floating_point():
                found.append(node)
        stack.extend(node.all_input_nodes)
    return found[0] if len(found) == 1 else None


def match(collective: fx.Node) -> Site | None:
    if not is_op(collective, ALL_REDUCE_OPS) or collective.args[1] != "sum":
        return None
    region = block_region(collective.args[0])
    embedding = region.first(EMBEDDING_OPS)
    if region.input_matmuls or embedding is None:
        return None
    table = attr_source(embedding.args[0])
    ids = _token_ids(embedding.args[1])
    if table is None or ids is None:
        return None
    wait = wait_of(collective)
    rewire = () if embedding.args[1] is ids else ((embedding.name, 1, ids.name),)
    return Site(
        kind=KIND,
        collective=collective.name,
        wait=wait.name if wait is not None else None,
        group=str(collective.args[2]),
        producer=embedding.name,
        replaced=(wait or collective).name,
        replacement=embedding.name,
        rewire=rewire,
        weights=(ShardedWeight(table.target, "vocab", 0),),
    )
