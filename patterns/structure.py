"""Structure shared by the site patterns: weight matmuls, blocks and their regions.

A TP block is "column-parallel linears → local compute → row-parallel linear → collective".
Patterns never look at names: a *weight matmul* is a matmul whose weight operand is a module
attribute (``get_attr``), and a block's *region* is everything between the row-parallel matmul
and the weight matmuls that feed it. The op sets and node helpers underneath are the project's
FX vocabulary (``adp_pass/fx_vocab.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx

from adp_pass.fx_vocab import (
    LINEAR_OPS,
    MATMUL_OPS,
    ORDER_KEEPING_VIEW_OPS,
    VIEW_OPS,
    attr_source,
    dim_arg,
    is_last_dim,
    is_op,
    through_views,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightMatmul:
    """A linear layer in ATen form: ``mm(x, t(W))``, ``addmm(b, x, t(W))``, ``linear`` or the
    FP8 ``adp::fp8_block_linear(x, W, W_scale_inv)``."""

    node: fx.Node
    activation: fx.Node
    weight: fx.Node  # the get_attr
    weight_in_dim: int  # dim of the stored weight that is contracted with the activation
    bias: fx.Node | None

    @property
    def weight_out_dim(self) -> int:
        return 1 - self.weight_in_dim


def as_weight_matmul(node: fx.Node) -> WeightMatmul | None:
    """Read ``node`` as a linear layer whose weight is a module attribute, else None."""
    if not is_op(node, MATMUL_OPS):
        return None
    if node.target in LINEAR_OPS:  # aten.linear, or the FP8 linear (whose third arg is a scale)
        weight = attr_source(node.args[1])
        has_bias = node.target is aten.linear.default and len(node.args) > 2
        bias = node.args[2] if has_bias else None
        return weight and WeightMatmul(node, node.args[0], weight, 1, bias)
    if node.target is aten.addmm.default:
        bias, activation, rhs = node.args[:3]
    else:
        bias, (activation, rhs) = None, node.args[:2]
    weight = attr_source(rhs)
    if weight is None:
        return None
    # mm contracts rhs dim 0; each transpose between the weight and rhs swaps which weight dim.
    transposes, cursor = 0, rhs
    while is_op(cursor, VIEW_OPS):
        if cursor.target in (aten.t.default, aten.transpose.int):
            transposes += 1
        cursor = cursor.args[0]
    in_dim = transposes % 2
    bias_attr = attr_source(bias) if bias is not None else None
    return WeightMatmul(node, activation, weight, in_dim, bias_attr)


def producer_matmul(node: fx.Node) -> WeightMatmul | None:
    """The weight matmul that directly produces ``node`` (through views), or None."""
    return as_weight_matmul(through_views(node))


@dataclass
class BlockRegion:
    """What lies between a block's output and the weight matmuls feeding it."""

    nodes: list[fx.Node]
    input_matmuls: list[WeightMatmul]

    def has(self, ops: Iterable) -> bool:
        ops = set(ops)
        return any(is_op(n, ops) for n in self.nodes)

    def first(self, ops: Iterable) -> fx.Node | None:
        ops = set(ops)
        return next((n for n in self.nodes if is_op(n, ops)), None)


def block_region(start: fx.Node) -> BlockRegion:
    """Walk up from ``start`` to the weight matmuls it depends on, not crossing them."""
    seen: set[fx.Node] = set()
    stack, nodes, matmuls = [start], [], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        matmul = as_weight_matmul(node)
        if matmul is not None:
            matmuls.append(matmul)
            continue
        nodes.append(node)
        stack.extend(node.all_input_nodes)
    matmuls.sort(key=lambda m: _position(m.node))
    return BlockRegion(nodes, matmuls)


def _position(node: fx.Node) -> int:
    # fx keeps nodes in a linked list; their order among siblings is the topological order.
    return node.meta.setdefault("_adp_pos", next(i for i, n in enumerate(node.graph.nodes) if n is node))


def annotate_positions(graph: fx.Graph) -> None:
    for index, node in enumerate(graph.nodes):
        node.meta["_adp_pos"] = index


def fused_segments(matmul: WeightMatmul) -> tuple[int, ...]:
    """Sizes of the column blocks a fused column-parallel output is split into (q|k|v, gate|up).

    Read off the split that consumes the matmul's output along its last dim; one segment when
    the output is used whole.
    """
    out = matmul.node
    width = out.meta["val"].shape[-1]
    for user in _users_through_views(out):
        if is_op(user, {aten.split_with_sizes.default}) and _splits_last_dim(user):
            return tuple(int(s) for s in user.args[1])
        if is_op(user, {aten.split.Tensor}) and _splits_last_dim(user):
            size = int(user.args[1])
            return tuple(min(size, width - start) for start in range(0, width, size))
    return (int(width),)


def _users_through_views(node: fx.Node) -> list[fx.Node]:
    users, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        if is_op(user, ORDER_KEEPING_VIEW_OPS):
            stack.extend(user.users)
        else:
            users.append(user)
    return users


def _splits_last_dim(split: fx.Node) -> bool:
    return is_last_dim(dim_arg(split, 2), split.args[0].meta["val"].dim())
