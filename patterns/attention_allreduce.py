"""Attention output all-reduce (after ``o_proj``).

Matches: an all-reduce of a row-parallel linear whose input comes from an attention core
(an SDPA op, or softmax-then-matmul when SDPA was decomposed), fed by column-parallel q/k/v
(separate or fused) projections.
Replaces with: the linear's output; o_proj and q/k/v weights become full (every head local).
"""

from __future__ import annotations

import torch.fx as fx

from adp_pass.fx_vocab import ATTENTION_CORE_OPS, SOFTMAX_OPS
from adp_pass.plan import Site
from adp_pass.patterns.block_allreduce import match_block_allreduce
from adp_pass.patterns.structure import BlockRegion

KIND = "attention_out"


def _is_attention(region: BlockRegion) -> bool:
    return region.has(ATTENTION_CORE_OPS) or region.has(SOFTMAX_OPS)


def match(collective: fx.Node) -> Site | None:
    return match_block_allreduce(collective, KIND, _is_attention)
