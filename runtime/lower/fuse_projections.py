"""Fuse projections that read the same input into one GEMM (q|k|v, gate|up).

Matches: two or more ``aten.mm(x, aten.t(W_i))`` (or ``aten.addmm(b_i, x, aten.t(W_i))``) whose
``x`` is the same tensor (the same node, or views of one node to the same 2-D shape) and whose
``W_i`` are module attributes read nowhere else.
Replaces with: one ``mm`` (``addmm``) on ``W = cat(W_i)`` (``b = cat(b_i)``) and a column slice
per original output.

Why: at decode batch sizes a GEMM is a weight read, and small ones read slowly (on the H200 the
1024-row k/v projections of Qwen3-8B ran at 1.45 TB/s against 3.4 TB/s for the 12288-row MLP
ones); one read of the concatenated weight also saves launches and cuBLAS split-K reductions.
vLLM and SGLang load q|k|v and gate|up as one parameter for the same reason.

Unlike the passes of ``PASSES`` this one needs the weights: it runs on a module whose weights
are filled (``prepare_rank`` runs it last, after the build cache stored or loaded the unfused
graph, so cache entries, the plan and checkpoints keep naming the original parameters). The
fused weight replaces the originals (they are deleted from the module), so memory does not grow.
The slices are column views: every consumer (``view``, the adp kernels, the paged-cache write)
takes strided inputs, so no copy is added.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
import torch.fx as fx

from adp_pass.attributes import owner_of, set_attr
from adp_pass.fx_vocab import NO_COPY_RESHAPE_OPS, is_op
from adp_pass.graph_record import FusedProjections, graph_record, has_graph_record

from .graph_utils import eliminate_dead_code, first_body_node

aten = torch.ops.aten


def fuse_projections(gm: fx.GraphModule) -> dict[str, int]:
    """Fuse every group of projections sharing an input, in place; ``{"groups": n, "gemms": m}``
    (``m`` GEMMs became ``n``), also in ``graph_record(gm).fused`` with the fused names. Graphs
    whose weights are on the meta device are left alone."""
    record = graph_record(gm)
    names = record.fused.names if record.fused is not None else {}  # of earlier calls too
    groups: dict[tuple, list[_Projection]] = defaultdict(list)
    reads = Counter(node.target for node in gm.graph.nodes if node.op == "get_attr")
    for node in gm.graph.nodes:
        projection = _projection(gm, node, reads)
        if projection is not None:
            groups[projection.key].append(projection)
    fused = gemms = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        _fuse(gm, members, names)
        fused += 1
        gemms += len(members)
    if fused:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
    record.fused = FusedProjections(fused, gemms, names)
    return record.fused.counts()


def unfused_state_dict(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``gm.state_dict()`` under the original names: each fused tensor split back into views of
    the parameters it replaced (a reference model or a checkpoint writer wants those)."""
    state = gm.state_dict()
    fused_names = graph_record(gm).fused if has_graph_record(gm) else None
    for fused, pieces in (fused_names.names if fused_names is not None else {}).items():
        tensor = state.pop(fused)
        start = 0
        for name, rows in pieces:
            state[name] = tensor[start:start + rows]
            start += rows
    return state


class _Projection:
    """One GEMM of a group: the node, its 2-D input, its weight (and bias) ``get_attr``, and the
    key its group shares."""

    __slots__ = ("node", "input", "weight", "bias", "key")

    def __init__(self, node: fx.Node, input: fx.Node, weight: fx.Node, bias: fx.Node | None,
                 key: tuple) -> None:
        self.node, self.input, self.weight, self.bias, self.key = node, input, weight, bias, key


def _projection(gm: fx.GraphModule, node: fx.Node, reads: Counter) -> _Projection | None:
    if is_op(node, {aten.mm.default}):
        bias, x, wt = None, *node.args
    elif is_op(node, {aten.addmm.default}) and not node.kwargs:
        bias, x, wt = node.args
    else:
        return None
    if not (isinstance(wt, fx.Node) and is_op(wt, {aten.t.default}) and len(wt.users) == 1):
        return None
    weight = wt.args[0]
    if not _sole_attribute(gm, weight, reads, dims=2):
        return None
    if bias is not None and not _sole_attribute(gm, bias, reads, dims=1):
        return None
    tensor = _attr(gm, weight)
    if tensor.device.type == "meta":
        return None
    # Views of one node to the same 2-D shape are one input: the fused GEMM reads the first.
    source = x
    while is_op(source, NO_COPY_RESHAPE_OPS | {aten.reshape.default}):
        source = source.args[0]
    shape = tuple(x.args[1]) if x is not source else None
    key = (source, shape, bias is not None, tensor.dtype, tensor.device, tensor.shape[1])
    return _Projection(node, x, weight, bias, key)


def _sole_attribute(gm: fx.GraphModule, node, reads: Counter, *, dims: int) -> bool:
    """``node`` reads a ``dims``-D tensor attribute that nothing else in the graph reads (a tied
    weight must keep its name)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1
            and reads[node.target] == 1):
        return False
    tensor = _attr(gm, node)
    return isinstance(tensor, torch.Tensor) and tensor.dim() == dims


def _attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    owner, leaf = owner_of(gm, node.target)
    return getattr(owner, leaf)


def _fuse(gm: fx.GraphModule, members: list[_Projection],
          names: dict[str, list[tuple[str, int]]]) -> None:
    graph = gm.graph
    weights = [_attr(gm, m.weight) for m in members]
    rows = [w.shape[0] for w in weights]
    fused_name = _register(gm, [m.weight for m in members], torch.cat(weights, dim=0), "weight")
    names[fused_name] = [(m.weight.target, r) for m, r in zip(members, rows)]
    fused_bias = None
    if members[0].bias is not None:
        biases = [m.bias for m in members]
        fused_bias = _register(gm, biases, torch.cat([_attr(gm, b) for b in biases]), "bias")
        names[fused_bias] = [(b.target, r) for b, r in zip(biases, rows)]
    for member in members:  # the originals go, so the module holds each weight once
        for attr in (member.weight, member.bias):
            if attr is not None:
                delattr(*owner_of(gm, attr.target))
    first = members[0].node
    with graph.inserting_before(first_body_node(graph)):
        weight_node = graph.get_attr(fused_name)
        bias_node = graph.get_attr(fused_bias) if fused_bias is not None else None
    with graph.inserting_before(first):
        # No fake values: this runs last, on real weights, where nothing reads them (and a
        # stamped or loaded graph mixes fake modes).
        transposed = graph.call_function(aten.t.default, (weight_node,))
        if bias_node is None:
            out = graph.call_function(aten.mm.default, (members[0].input, transposed))
        else:
            out = graph.call_function(aten.addmm.default,
                                      (bias_node, members[0].input, transposed))
        start = 0
        for member, width in zip(members, rows):
            piece = graph.call_function(aten.slice.Tensor, (out, 1, start, start + width))
            start += width
            member.node.replace_all_uses_with(piece)
    for member in members:
        transposed_weight = member.node.args[-1]
        graph.erase_node(member.node)
        graph.erase_node(transposed_weight)
        graph.erase_node(member.weight)
        if member.bias is not None:
            graph.erase_node(member.bias)


def _register(gm: fx.GraphModule, attrs: list[fx.Node], value: torch.Tensor, kind: str) -> str:
    """Register ``value`` (a parameter where the first of ``attrs`` is one) under the modules
    ``attrs`` share, named after each of them:
    ``model.layers.0.self_attn.q_proj.weight`` + ``k_proj`` + ``v_proj`` ->
    ``model.layers.0.self_attn.fused_q_proj_k_proj_v_proj_weight``."""
    parts = [a.target.split(".") for a in attrs]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    leaf = "fused_" + "_".join("_".join(p[common:-1]) or p[-1] for p in parts) + f"_{kind}"
    name = ".".join([*parts[0][:common], leaf])
    if isinstance(_attr(gm, attrs[0]), torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    set_attr(gm, name, value, persistent=True)
    return name
