"""Structural vocabulary shared by the site patterns: collectives, weight matmuls, blocks.

A TP block is "column-parallel linears → local compute → row-parallel linear → collective".
Patterns never look at names: a *weight matmul* is a matmul whose weight operand is a module
attribute (``get_attr``), and a block's *region* is everything between the row-parallel matmul
and the weight matmuls that feed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx

aten = torch.ops.aten
c10d_functional = torch.ops._c10d_functional

# Every spelling of an all-reduce we can remove: the functional op, its in-place twin.
ALL_REDUCE_OPS = (c10d_functional.all_reduce.default, c10d_functional.all_reduce_.default)
ALL_GATHER_OPS = (c10d_functional.all_gather_into_tensor.default,)
WAIT_OPS = (c10d_functional.wait_tensor.default,)
# Collectives we recognise as collectives but have no pattern for (reported, never ignored).
OTHER_COLLECTIVE_OPS = tuple(
    getattr(c10d_functional, name).default
    for name in (
        "reduce_scatter_tensor",
        "all_to_all_single",
        "broadcast",
        "all_reduce_coalesced",
        "all_gather_into_tensor_coalesced",
        "reduce_scatter_tensor_coalesced",
    )
    if hasattr(c10d_functional, name)
)
if hasattr(torch.ops, "c10d") and hasattr(torch.ops.c10d, "allreduce_"):
    OTHER_COLLECTIVE_OPS += (torch.ops.c10d.allreduce_.default,)
COLLECTIVE_OPS = set(ALL_REDUCE_OPS) | set(ALL_GATHER_OPS) | set(OTHER_COLLECTIVE_OPS)

# Ops that only re-view or copy data: walked through when looking for a producer.
VIEW_OPS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten._to_copy.default,
}
MATMUL_OPS = {aten.mm.default, aten.addmm.default, aten.linear.default}
ATTENTION_CORE_OPS = {
    op
    for name in (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
    )
    if hasattr(aten, name)
    for op in [getattr(aten, name).default]
}
SOFTMAX_OPS = {aten._softmax.default, aten.softmax.int}
if hasattr(aten, "_safe_softmax"):
    SOFTMAX_OPS.add(aten._safe_softmax.default)
GATED_ACTIVATION_OPS = {aten.silu.default}
EMBEDDING_OPS = {aten.embedding.default}


def is_op(node: fx.Node, ops: Iterable) -> bool:
    return node.op == "call_function" and node.target in ops


def through_views(node: fx.Node) -> fx.Node:
    """The first node above ``node`` that is not a view/copy."""
    while is_op(node, VIEW_OPS):
        node = node.args[0]
    return node


def attr_source(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` a tensor is a (transposed) view of, or None."""
    node = through_views(node)
    return node if node.op == "get_attr" else None


@dataclass(frozen=True)
class WeightMatmul:
    """A linear layer in ATen form: ``mm(x, t(W))``, ``addmm(b, x, t(W))`` or ``linear``."""

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
    if node.target is aten.linear.default:
        weight = attr_source(node.args[1])
        bias = node.args[2] if len(node.args) > 2 else None
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


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that reads ``node``, directly or not."""
    seen, stack = set(), list(node.users)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.users)
    return seen


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` reads, directly or not."""
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def nodes_between(start: fx.Node, end: fx.Node) -> set[fx.Node]:
    """Nodes on a path from ``start`` (exclusive) to ``end`` (inclusive)."""
    return descendants(start) & (ancestors(end) | {end})


def wait_of(collective: fx.Node) -> fx.Node | None:
    """The ``wait_tensor`` consuming a functional collective's result, if any."""
    waits = [u for u in collective.users if is_op(u, WAIT_OPS)]
    return waits[0] if len(waits) == 1 else None


def fused_segments(matmul: WeightMatmul) -> tuple[int, ...]:
    """Sizes of the column blocks a fused column-parallel output is split into (q|k|v, gate|up).

    Read off the split that consumes the matmul's output along its last dim; one segment when
    the output is used whole.
    """
    out = matmul.node
    width = out.meta["val"].shape[-1]
    for user in _users_through_views(out):
        if is_op(user, {aten.split_with_sizes.default}) and _last_dim(user, 2):
            return tuple(int(s) for s in user.args[1])
        if is_op(user, {aten.split.Tensor}) and _last_dim(user, 2):
            size = int(user.args[1])
            return tuple(min(size, width - start) for start in range(0, width, size))
    return (int(width),)


def _users_through_views(node: fx.Node) -> list[fx.Node]:
    users, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        if is_op(user, VIEW_OPS - {aten.t.default, aten.transpose.int, aten.permute.default}):
            stack.extend(user.users)
        else:
            users.append(user)
    return users


def _last_dim(split: fx.Node, dim_index: int) -> bool:
    dim = split.args[dim_index] if len(split.args) > dim_index else split.kwargs.get("dim", 0)
    rank = split.args[0].meta["val"].dim()
    return dim in (-1, rank - 1)
