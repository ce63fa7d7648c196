"""Lowering pass ``add_rms_norm``.

Matches: ``adp.rms_norm(add(a, b), w, eps)`` left by the ``rms_norm`` pass, where the ``add`` is a
residual add: two tensors of the add's own shape and dtype (no broadcasting, no ``alpha``). In a
Qwen3 decoder these are ``residual + attn_out`` -> ``post_attention_layernorm`` and
``residual + mlp_out`` -> the next layer's ``input_layernorm`` or the final ``norm``.

Replaces with: ``normed, new_residual = adp.add_rms_norm(b, a, w, eps)``; the norm's uses read
``normed`` and every other use of the ``add`` (the next residual add) reads ``new_residual``,
so the sum is written once and read once. ``add`` is commutative bit for bit, so the operand order
does not change numerics; the kernel rounds the sum to the model dtype before normalising, as eager
does.

Node-walk pass: the rewrite has two outputs and redirects the add's other users, which a
single-output replacement pattern cannot express. The fused node is inserted right after the
``add`` (so every old user of the sum comes after it), provided the weight is defined before it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import adp, aten, call, getitem, positions, same_shape

NAME = "add_rms_norm"
REQUIRES: tuple[str, ...] = ("rms_norm",)


def _residual_operands(add: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if add.op != "call_function" or add.target is not aten.add.Tensor:
        return None
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    out, va, vb = add.meta.get("val"), a.meta.get("val"), b.meta.get("val")
    if not all(isinstance(v, torch.Tensor) for v in (out, va, vb)):
        return None
    if not (va.dtype == vb.dtype == out.dtype and out.dtype.is_floating_point):
        return None
    if not (same_shape(va.shape, out.shape) and same_shape(vb.shape, out.shape)):
        return None
    return a, b


def run(gm: fx.GraphModule, ctx) -> int:
    graph = gm.graph
    order = positions(graph)
    count = 0
    for norm in list(graph.find_nodes(op="call_function", target=adp.rms_norm.default)):
        x, weight, eps = norm.args
        operands = _residual_operands(x) if isinstance(x, fx.Node) else None
        if operands is None:
            continue
        add = x
        if isinstance(weight, fx.Node) and order[weight] > order[add]:
            continue  # weight computed after the add: no single place to put the fused op
        residual, hidden = operands
        with graph.inserting_after(add):
            fused = call(graph, adp.add_rms_norm.default, hidden, residual, weight, eps)
        with graph.inserting_after(fused):
            normed = getitem(graph, fused, 0)
        with graph.inserting_after(normed):
            new_residual = getitem(graph, fused, 1)
        normed.meta.update({k: v for k, v in norm.meta.items() if k != "val"})
        norm.replace_all_uses_with(normed)
        graph.erase_node(norm)
        add.replace_all_uses_with(new_residual, delete_user_cb=lambda user: user is not fused)
        graph.erase_node(add)
        count += 1
    return count
