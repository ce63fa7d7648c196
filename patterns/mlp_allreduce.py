"""MLP output all-reduce (after ``down_proj``).

Matches: an all-reduce of a row-parallel linear whose input is a gated activation
``silu(gate) * up`` of column-parallel gate/up projections (separate or fused), with no
attention core in between.
Replaces with: the linear's output; down/gate/up weights become full (replicated MLP).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from adp_pass.fx_vocab import ATTENTION_CORE_OPS, GATED_ACTIVATION_OPS, SOFTMAX_OPS
from adp_pass.plan import Site
from adp_pass.patterns.block_allreduce import match_block_allreduce
from adp_pass.patterns.structure import BlockRegion

KIND = "mlp_out"
aten = torch.ops.aten


def _is_gated_mlp(region: BlockRegion) -> bool:
    if region.has(ATTENTION_CORE_OPS) or region.has(SOFTMAX_OPS):
        return False
    return region.has(GATED_ACTIVATION_OPS) and region.has({aten.mul.Tensor})


def match(collective: fx.Node) -> Site | None:
    return match_block_allreduce(collective, KIND, _is_gated_mlp)
