"""The FX vocabulary every stage speaks: which ATen ops are which, and a few node helpers.

Op sets and helpers that the site patterns, detect, the sharding analysis, rewrite, the lowering
and the cache insertion all need. It imports nothing from the project but ``adp_pass.fp8`` (the
foundation's definition of the FP8 linear op, torch only), so any stage can use it
without depending on another stage: the lowering reads ``ATTENTION_CORE_OPS`` here, not from the
site-pattern package (docs/design.md, "Module layering").

Sets that look alike but differ on purpose are kept apart and named by what they mean: e.g.
``VIEW_OPS`` (walked through to find a tensor's producer) is not ``REPEAT_KV_OPS`` (what lies
between an attention input and its per-head tensor). Sets that one module alone needs stay in
that module, built from these.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from adp_pass import fp8  # defines adp::fp8_block_linear, so the op below exists

aten = torch.ops.aten
c10d_functional = torch.ops._c10d_functional

# ----------------------------------------------------------------------------- collectives
# Every spelling of an all-reduce the rewrite can remove: the functional op, its in-place twin.
ALL_REDUCE_OPS = (c10d_functional.all_reduce.default, c10d_functional.all_reduce_.default)
ALL_GATHER_OPS = (c10d_functional.all_gather_into_tensor.default,)
WAIT_OPS = (c10d_functional.wait_tensor.default,)
# Collectives recognised as collectives with no site pattern (reported, never ignored).
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

# ----------------------------------------------------------------------------- layout ops
# Views whose size list is the new shape (a per-rank count can hide in it).
RESHAPE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# The two of those that never copy: at full size one may have to become a reshape.
NO_COPY_RESHAPE_OPS = {aten.view.default, aten._unsafe_view.default}
TRANSPOSE_OPS = {aten.t.default, aten.transpose.int, aten.permute.default}
# Same values in a new tensor: copies and dtype casts.
COPY_OPS = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten._to_copy.default}
# Ops that only re-view or copy one tensor: walked through when looking for its producer.
VIEW_OPS = (
    RESHAPE_OPS | TRANSPOSE_OPS | COPY_OPS | {aten.squeeze.dim, aten.unsqueeze.default}
)
# The views above that keep the last dim last (a fused q|k|v split is still readable after them).
ORDER_KEEPING_VIEW_OPS = VIEW_OPS - TRANSPOSE_OPS
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default}
SLICE_OPS = {aten.slice.Tensor, aten.narrow.default}
# What lies between an attention op's k/v (or q) input and the [B, H, S, D] tensor it was made
# from: GQA's repeat_kv (unsqueeze, expand, reshape), repeat_interleave, contiguity copies and
# slices (callers decide whether a slice that cuts is crossed).
REPEAT_KV_OPS = RESHAPE_OPS | {
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.slice.Tensor,
    aten.repeat_interleave.self_int,
}

# ----------------------------------------------------------------------------- compute ops
# FP8 block-scaled linears: ``(x, weight [N, K] e4m3, weight_scale_inv [N/128, K/128])``.
FP8_LINEAR_OPS = {fp8.fp8_block_linear._opoverload}
# Linears that take the stored weight [N, K] as is (``x @ W.T``, no transpose node): the third
# argument is aten.linear's bias but the FP8 op's scale.
LINEAR_OPS = {aten.linear.default} | FP8_LINEAR_OPS
# A linear layer in ATen form (the weight matmul of the patterns).
MATMUL_OPS = {aten.mm.default, aten.addmm.default} | LINEAR_OPS
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
# Attention decomposed (on meta tensors SDPA becomes bmm / softmax / bmm).
SOFTMAX_OPS = {aten._softmax.default, aten.softmax.int}
if hasattr(aten, "_safe_softmax"):
    SOFTMAX_OPS.add(aten._safe_softmax.default)
GATED_ACTIVATION_OPS = {aten.silu.default}
EMBEDDING_OPS = {aten.embedding.default}


# ----------------------------------------------------------------------------- node helpers
def is_op(node: fx.Node, ops: Iterable) -> bool:
    return node.op == "call_function" and node.target in ops


def dim_arg(node: fx.Node, index: int, default: int = 0) -> Any:
    """``node``'s ``dim`` argument: positional at ``index``, else the keyword, else ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get("dim", default)


def is_last_dim(dim: int, rank: int) -> bool:
    return dim in (-1, rank - 1)


def through_views(node: fx.Node) -> fx.Node:
    """The first node above ``node`` that is not a view/copy."""
    while is_op(node, VIEW_OPS):
        node = node.args[0]
    return node


def attr_source(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` a tensor is a (transposed) view of, or None."""
    node = through_views(node)
    return node if node.op == "get_attr" else None


def wait_of(collective: fx.Node) -> fx.Node | None:
    """The ``wait_tensor`` consuming a functional collective's result, if any."""
    waits = [u for u in collective.users if is_op(u, WAIT_OPS)]
    return waits[0] if len(waits) == 1 else None


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


def is_impure_except_collectives(node: fx.Node) -> bool:
    """``is_impure_node`` for ``Graph.eliminate_dead_code`` on graphs with collectives: fx keeps
    ``wait_tensor`` and collectives as side-effecting, but one whose result nobody reads is what
    a rewrite or a lowering pass left behind, and may go. Everything else: as fx says."""
    if is_op(node, WAIT_OPS) or is_op(node, COLLECTIVE_OPS):
        return False
    return node.is_impure()


# ----------------------------------------------------------------------------- value metadata
# Shape walks and pattern traces repeat the same call once per decoder layer; a call is known
# by its op and this key of its arguments, so a repeat can reuse the first result.
class NoMetadataKey(ValueError):
    """A value with no plain metadata description (an opaque object)."""


def _size_key(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else size


def metadata_key(value: Any) -> Any:
    """A hashable description of a fake value's metadata (tensors: dtype, device, sizes,
    strides, offset; symbolic sizes: their sympy expressions; constants: themselves)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.device, tuple(map(_size_key, value.shape)),
                tuple(map(_size_key, value.stride())), _size_key(value.storage_offset()))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", value.node.expr)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(metadata_key, value))
    if isinstance(value, dict):
        return ("dict", *((k, metadata_key(v)) for k, v in sorted(value.items())))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device,
                                           torch.layout, torch.memory_format)):
        return (type(value).__name__, value)
    raise NoMetadataKey


__all__ = [
    "ALL_GATHER_OPS", "ALL_REDUCE_OPS", "ATTENTION_CORE_OPS", "COLLECTIVE_OPS", "COPY_OPS",
    "EMBEDDING_OPS", "FP8_LINEAR_OPS", "GATED_ACTIVATION_OPS", "LINEAR_OPS", "MATMUL_OPS", "NO_COPY_RESHAPE_OPS",
    "ORDER_KEEPING_VIEW_OPS", "OTHER_COLLECTIVE_OPS", "REPEAT_KV_OPS", "RESHAPE_OPS",
    "NoMetadataKey", "SLICE_OPS", "SOFTMAX_OPS", "SPLIT_OPS", "TRANSPOSE_OPS", "VIEW_OPS", "WAIT_OPS", "aten",
    "ancestors", "attr_source", "copy_graph", "descendants", "dim_arg", "is_last_dim", "is_op",
    "is_impure_except_collectives", "metadata_key", "nodes_between", "through_views", "wait_of",
]


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A new graph holding ``graph``'s nodes (names kept) and its output."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy
