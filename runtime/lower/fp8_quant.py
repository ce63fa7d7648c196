"""Lowering pass ``fp8_quant``: an FP8 linear's activation quantized by the op that produces it.

Matches: an ``adp.rms_norm`` / ``adp.add_rms_norm`` (its normed output) / ``adp.silu_mul`` whose
output is read only by ``adp.fp8_block_linear`` as its ``x`` (directly or through
``view`` / ``_unsafe_view`` / ``reshape`` that keep the last dim), e.g. a Qwen3 layer's input norm
feeding q/k/v, its post-attention norm feeding gate/up, its SwiGLU feeding down_proj.

Replaces with: the producer's ``_fp8`` variant (``adp.rms_norm_fp8``, ``adp.add_rms_norm_fp8``,
``adp.silu_mul_fp8``: e4m3 values + one fp32 scale per token and 128-wide group) and, per
consumer, ``adp.fp8_block_linear_quantized(x_fp8, x_scale, W, W_scale_inv, out_dtype)`` on the
same views of both. The activation is then written once, at one byte per element, instead of in
the model dtype and quantized again by every linear that reads it (three times for q/k/v).

Numerics: the producers quantize exactly as ``fp8.quantize_activation`` does on the unfused op's
output (tests/test_fp8_kernels.py), which is what ``fp8_block_linear`` does to its ``x``; so both
GEMMs see the same e4m3 codes and scales. A producer with any other reader (the final norm
feeding the bf16 LM head, a norm read twice) is left alone, with a note.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from adp_pass import fp8
from adp_pass.fx_vocab import is_op

from .graph_utils import adp, call, getitem

NAME = "fp8_quant"
# The producers are the kernels the earlier passes put in.
REQUIRES: tuple[str, ...] = ("rms_norm", "add_rms_norm", "silu_mul")

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def run(gm: fx.GraphModule, ctx) -> int:
    import adp_pass.runtime.kernels  # noqa: F401 - registers the _fp8 ops and their fakes

    graph = gm.graph
    linear_op = torch.ops.adp.fp8_block_linear.default
    fused = 0
    for node in list(graph.nodes):
        if is_op(node, {adp.rms_norm.default, adp.silu_mul.default}):
            out = node
        elif is_op(node, {adp.add_rms_norm.default}):
            outs = [u for u in node.users if is_op(u, {operator.getitem}) and u.args[1] == 0]
            if len(outs) != 1:
                continue
            out = outs[0]
        else:
            continue
        consumers = _fp8_consumers(out, linear_op)
        if consumers is None:
            if _reaches(out, linear_op):
                ctx.note(NAME, f"{node.name} feeds an FP8 linear and other ops: left unfused")
            continue
        _fuse(graph, node, out, consumers)
        fused += 1
    return fused


def _fp8_consumers(out: fx.Node, linear_op) -> list[fx.Node] | None:
    """The fp8 linears reading ``out`` as ``x`` through last-dim-keeping views, or None when
    anything else reads it (or a view in between)."""
    k = out.meta["val"].shape[-1]
    if not isinstance(k, int):
        return None
    linears, stack = [], [out]
    while stack:
        current = stack.pop()
        for user in current.users:
            if (is_op(user, {linear_op}) and user.args[0] is current
                    and current not in user.args[1:]):
                linears.append(user)
            elif is_op(user, _VIEWS) and user.args[0] is current and _keeps_last(user, k):
                stack.append(user)
            else:
                return None
    return linears or None


def _keeps_last(view: fx.Node, k: int) -> bool:
    shape = view.args[1]
    return (isinstance(shape, (list, tuple)) and len(shape) >= 1 and shape[-1] in (k, -1)
            and view.meta.get("val") is not None and view.meta["val"].shape[-1] == k)


def _reaches(out: fx.Node, linear_op) -> bool:
    stack = [out]
    while stack:
        current = stack.pop()
        for user in current.users:
            if is_op(user, {linear_op}):
                return True
            if is_op(user, _VIEWS):
                stack.append(user)
    return False


def _fuse(graph: fx.Graph, producer: fx.Node, out: fx.Node, linears: list[fx.Node]) -> None:
    with graph.inserting_before(producer):
        if is_op(producer, {adp.rms_norm.default}):
            new = call(graph, adp.rms_norm_fp8.default, *producer.args)
        elif is_op(producer, {adp.silu_mul.default}):
            new = call(graph, adp.silu_mul_fp8.default, *producer.args)
        else:
            new = call(graph, adp.add_rms_norm_fp8.default, *producer.args)
        q, scales = getitem(graph, new, 0), getitem(graph, new, 1)
        if is_op(producer, {adp.add_rms_norm.default}):
            residual = getitem(graph, new, 2)
            for user in list(producer.users):
                if user.args[1] == 1:  # the new residual: same value, from the fused op
                    user.replace_all_uses_with(residual)
    k = out.meta["val"].shape[-1]
    groups = math.ceil(k / fp8.ACTIVATION_GROUP)
    for linear in linears:
        x, weight, scale_inv = linear.args
        with graph.inserting_before(linear):
            if x is out:
                x_q, x_s = q, scales
            else:  # the same view of the codes, and of their scale grid
                shape = list(x.args[1])
                x_q = call(graph, x.target, q, shape)
                x_s = call(graph, x.target, scales, shape[:-1] + [groups])
            dtype = linear.meta["val"].dtype
            quantized = call(graph, adp.fp8_block_linear_quantized.default, x_q, x_s, weight,
                             scale_inv, dtype)
        quantized.meta.update({key: value for key, value in linear.meta.items()
                               if key in ("nn_module_stack", "stack_trace")})
        linear.replace_all_uses_with(quantized)
        graph.erase_node(linear)
