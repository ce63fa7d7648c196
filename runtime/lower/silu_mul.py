"""Lowering pass ``silu_mul``.

Matches: the SwiGLU activation of ``Qwen3MLP``, ``mul(silu(gate), up)`` (either operand order),
where ``gate`` and ``up`` have the same shape and dtype (no broadcasting); and the fused-matmul
form where ``gate`` and ``up`` are the two halves of one ``gate_up`` tensor along its last dim,
taken by ``chunk(2, -1)`` (ATen ``split.Tensor``), ``split([I, I], -1)``
(``split_with_sizes``) or ``gate_up[..., :I]`` / ``gate_up[..., I:]`` (two ``slice``).

Replaces with: ``torch.ops.adp.silu_mul_fused(gate_up)`` for the fused forms, otherwise
``torch.ops.adp.silu_mul(gate, up)``. The count is the number of activations replaced (both
kinds); ``graph_record(gm).lowering.ops`` tells the kinds apart.

Pattern-matcher pass (``register_replacement``, patterns traced with ``fwd_only`` on tiny
tensors). The fused patterns are registered first: all patterns end in the same ``mul``, and
entries are tried in registration order, so a split ``gate_up`` never ends up as
``silu_mul(getitem, getitem)``. A ``silu`` (or a split half) with other users is not matched.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import adp, apply_patterns, match_value, register, same_shape

NAME = "silu_mul"
REQUIRES: tuple[str, ...] = ()


def _chunk(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _split(gate_up: torch.Tensor) -> torch.Tensor:
    half = gate_up.shape[-1] // 2
    gate, up = gate_up.split([half, half], dim=-1)
    return F.silu(gate) * up


def _slices(gate_up: torch.Tensor) -> torch.Tensor:
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


def _fused(gate_up: torch.Tensor) -> torch.Tensor:
    return adp.silu_mul_fused(gate_up)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _up_silu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return up * F.silu(gate)


def _separate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return adp.silu_mul(gate, up)


def _fused_check(match) -> bool:
    gate_up = match_value(match, "gate_up")
    return (
        isinstance(gate_up, torch.Tensor)
        and gate_up.dim() >= 1
        and gate_up.dtype.is_floating_point
        and gate_up.shape[-1] % 2 == 0
    )


def _separate_check(match) -> bool:
    gate, up = match_value(match, "gate"), match_value(match, "up")
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        return False
    if gate.dtype != up.dtype or not gate.dtype.is_floating_point or gate.dim() != up.dim():
        return False
    return same_shape(gate.shape, up.shape)


@functools.cache
def _patterns():
    from torch._inductor.pattern_matcher import PatternMatcherPass

    patterns = PatternMatcherPass(pass_name="adp_lower_silu_mul")
    # No casts in these patterns, so one dtype covers all (the matched dtypes are re-checked).
    gate_up = [torch.empty(2, 3, 16)]
    for search in (_chunk, _split, _slices):
        register(search, _fused, gate_up, patterns, extra_check=_fused_check)
    pair = [torch.empty(2, 3, 8), torch.empty(2, 3, 8)]
    for search in (_silu_mul, _up_silu):
        register(search, _separate, pair, patterns, extra_check=_separate_check)
    return patterns


def run(gm: fx.GraphModule, ctx) -> int:
    return apply_patterns(_patterns(), gm)
