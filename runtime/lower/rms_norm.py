"""Lowering pass ``rms_norm``.

Matches: transformers' ``Qwen3RMSNorm`` in ATen form, over the last dim of any tensor (decoder
layer norms, the final norm, and the per-head q/k norms on the ``[B, S, H, D]`` view)::

    fp32 model:      pow(x, 2) -> mean([-1], keepdim) -> add(eps) -> rsqrt -> mul(x, .) -> mul(w, .)
    bf16/fp16 model: _to_copy(x, fp32) -> (same) -> _to_copy(., x.dtype) -> mul(w, .)

Replaces with: ``torch.ops.adp.rms_norm(x, w, eps)`` (same dtype promotion as eager:
``promote(x, w)``). Every RMSNorm is counted here, including those that ``add_rms_norm`` and
``qk_norm_rope`` absorb later; those passes work on the ``adp.rms_norm`` nodes this one leaves.

Pattern-matcher pass (``register_replacement``): pattern and replacement are traced with
``fwd_only`` (no decompositions) on tiny example tensors; eps is a wildcard
(``scalar_workaround``), the rest of the literals (the exponent 2, dims ``[-1]``, the cast dtypes)
are re-checked on each match by re-tracing the pattern with the matched values.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from adp_pass.runtime.kernels import reference

from .graph_utils import adp, apply_patterns, match_value, register

NAME = "rms_norm"
REQUIRES: tuple[str, ...] = ()


# The pattern is Qwen3RMSNorm.forward itself (the runtime's copy of it); in fp32 its two casts
# vanish from the trace.
_search = reference.rms_norm


def _replace(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return adp.rms_norm(x, weight, eps)


def _extra_check(match) -> bool:
    x, weight = match_value(match, "x"), match_value(match, "weight")
    eps = match_value(match, "eps", default=0.0)  # a literal already matched on torch 2.11
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return False
    if not isinstance(eps, (int, float)) or x.dim() == 0:
        return False
    if not (x.dtype.is_floating_point and weight.dtype.is_floating_point):
        return False
    # The kernel takes a [hidden] weight; a broadcasting weight of another shape stays decomposed.
    return weight.dim() == 1 and weight.shape[0] == x.shape[-1]


@functools.cache
def _patterns():
    from torch._inductor.pattern_matcher import PatternMatcherPass

    patterns = PatternMatcherPass(pass_name="adp_lower_rms_norm")
    # fp32 has no casts; bf16 stands for every low-precision dtype (the cast dtypes are ignored by
    # the first, structural match and re-checked against the matched dtypes).
    for dtype in (torch.float32, torch.bfloat16):
        example = [torch.empty(2, 8, dtype=dtype), torch.empty(8, dtype=dtype)]
        register(_search, _replace, example, patterns, extra_check=_extra_check, eps=True)
    return patterns


def run(gm: fx.GraphModule, ctx) -> int:
    return apply_patterns(_patterns(), gm)
