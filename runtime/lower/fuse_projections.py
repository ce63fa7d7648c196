"""Fuse projections that read the same input into one GEMM (q|k|v, gate|up), bf16 and FP8.

Matches: two or more ``aten.mm(x, aten.t(W_i))`` (or ``aten.addmm(b_i, x, aten.t(W_i))``) whose
``x`` is the same tensor (the same node, or views of one node to the same shape) and whose
``W_i`` are module attributes read nowhere else. FP8 linears alike (docs/fp8.md, "Projection
fusion"): two or more ``adp.fp8_block_linear(x, W_i, S_i)`` sharing ``x``, or
``adp.fp8_block_linear_quantized(x_fp8, x_scale, W_i, S_i, out_dtype)`` sharing ``x_fp8``,
``x_scale`` and ``out_dtype`` (what ``fp8_quant`` leaves after a norm feeding q/k/v or gate/up).
Replaces with: one ``mm`` (``addmm``) on ``W = cat(W_i)`` (``b = cat(b_i)``), or one FP8 linear
on ``W = cat(W_i)`` and ``S = cat(S_i)`` (both along N, dim 0), and a slice of the last dim per
original output.

FP8 groups fuse only where the scale grids line up: ``S_i`` has one row per 128 rows of ``W_i``
(``ceil``), so ``cat(S_i)`` is the scale grid of ``cat(W_i)`` exactly when every member but the
last has ``N_i % 128 == 0``; otherwise the member's partial last tile row would hand its scale
to the next member's first rows. Such a group, and one whose scales differ in dtype (kept as
stored, never converted), is left unfused and counted: ``refused`` in the counts, the reason in
``graph_record(gm).fused.refused``. The fused FP8 GEMM forms the same per-tile products and
sums each output column's K tiles in the same order as the member's GEMM did (docs/fp8.md says
where on a GPU the split-K count may still differ).

Why: at decode batch sizes a GEMM is a weight read, and small ones read slowly (on the H200 the
1024-row k/v projections of Qwen3-8B ran at 1.45 TB/s against 3.4 TB/s for the 12288-row MLP
ones); one read of the concatenated weight also saves launches and cuBLAS split-K reductions.
vLLM and SGLang load q|k|v and gate|up as one parameter for the same reason, FP8 too.

Unlike the passes of ``PASSES`` this one needs the weights: it runs on a module whose weights
are filled (``prepare_rank`` runs it last, after the build cache stored or loaded the unfused
graph, so cache entries, the plan and checkpoints keep naming the original parameters; on an FP8
rank that is after the lowering's ``fp8_quant``, so the fused linear reads the activation its
producer already quantized). The fused tensors replace the originals (they are deleted from the
module), so memory does not grow; ``unfused_state_dict`` splits them back (a scale by its tile
rows). The slices are column views: every consumer (``view``, the adp kernels, the paged-cache
write) takes strided inputs, so no copy is added.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
import torch.fx as fx

from adp_pass import fp8
from adp_pass.attributes import owner_of, set_attr
from adp_pass.fx_vocab import NO_COPY_RESHAPE_OPS, is_op
from adp_pass.graph_record import FusedProjections, graph_record, has_graph_record

from .graph_utils import adp, eliminate_dead_code, first_body_node

aten = torch.ops.aten
FP8_LINEAR = adp.fp8_block_linear.default  # (x, W, S)
FP8_LINEAR_QUANTIZED = adp.fp8_block_linear_quantized.default  # (x_fp8, x_scale, W, S, dtype)
TILE = fp8.WEIGHT_BLOCK[0]  # weight rows per scale row


def fuse_projections(gm: fx.GraphModule) -> dict[str, int]:
    """Fuse every group of projections sharing an input, in place; ``{"groups": n, "gemms": m}``
    (``m`` GEMMs became ``n``), plus ``"refused": r`` when ``r`` FP8 groups could not be fused
    exactly (module docstring); also in ``graph_record(gm).fused`` with the fused names and the
    refusals' reasons. Graphs whose weights are on the meta device are left alone."""
    record = graph_record(gm)
    names = record.fused.names if record.fused is not None else {}  # of earlier calls too
    groups: dict[tuple, list[_Projection]] = defaultdict(list)
    reads = Counter(node.target for node in gm.graph.nodes if node.op == "get_attr")
    for node in gm.graph.nodes:
        projection = _projection(gm, node, reads)
        if projection is not None:
            groups[projection.key].append(projection)
    fused = gemms = 0
    refused: list[str] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        reason = _fp8_refusal(gm, members) if members[0].kind != "mm" else None
        if reason is not None:
            refused.append(reason)
            continue
        _fuse(gm, members, names)
        fused += 1
        gemms += len(members)
    if fused:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
    record.fused = FusedProjections(fused, gemms, names, refused)
    return record.fused.counts()


def unfused_state_dict(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``gm.state_dict()`` under the original names: each fused tensor split back into views of
    the parameters it replaced (a reference model or a checkpoint writer wants those; an FP8
    scale grid by its tile rows)."""
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
    """One GEMM of a group: the node, its kind (``"mm"``, ``"fp8"``, ``"fp8_quantized"``), its
    input (``x``, or ``x_fp8`` and ``x_scale``), its weight (and bias, or FP8 scale) ``get_attr``,
    and the key its group shares."""

    __slots__ = ("node", "kind", "input", "x_scale", "weight", "bias", "scale", "key")

    def __init__(self, node: fx.Node, kind: str, input: fx.Node, weight: fx.Node, key: tuple, *,
                 bias: fx.Node | None = None, scale: fx.Node | None = None,
                 x_scale: fx.Node | None = None) -> None:
        self.node, self.kind, self.input, self.weight, self.key = node, kind, input, weight, key
        self.bias, self.scale, self.x_scale = bias, scale, x_scale


def _projection(gm: fx.GraphModule, node: fx.Node, reads: Counter) -> _Projection | None:
    if is_op(node, {FP8_LINEAR, FP8_LINEAR_QUANTIZED}) and not node.kwargs:
        return _fp8_projection(gm, node, reads)
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
    key = ("mm", *_source(x), bias is not None, tensor.dtype, tensor.device, tensor.shape[1])
    return _Projection(node, "mm", x, weight, key, bias=bias)


def _fp8_projection(gm: fx.GraphModule, node: fx.Node, reads: Counter) -> _Projection | None:
    """An FP8 linear whose weight and scale are attributes read by it alone. The scale dtype is
    not in the key: a group mixing them is found, then refused by name (``_fp8_refusal``)."""
    if is_op(node, {FP8_LINEAR}):
        x, weight, scale = node.args
        x_scale, kind, extra = None, "fp8", ()
    else:
        x, x_scale, weight, scale, out_dtype = node.args
        if not isinstance(x_scale, fx.Node):
            return None
        kind, extra = "fp8_quantized", (*_source(x_scale), out_dtype)
    if not (isinstance(x, fx.Node) and _sole_attribute(gm, weight, reads, dims=2)
            and _sole_attribute(gm, scale, reads, dims=2)):
        return None
    tensor = _attr(gm, weight)
    if tensor.device.type == "meta" or tensor.dtype != fp8.E4M3:
        return None
    key = (kind, *_source(x), *extra, tensor.device, tensor.shape[1])
    return _Projection(node, kind, x, weight, key, scale=scale, x_scale=x_scale)


def _source(x) -> tuple:
    """``(node, shape)`` naming what ``x`` reads: views of one node to the same shape are one
    input (the fused GEMM reads the first); ``shape`` None for the node itself."""
    source = x
    while is_op(source, NO_COPY_RESHAPE_OPS | {aten.reshape.default}):
        source = source.args[0]
    return source, (tuple(x.args[1]) if x is not source else None)


def _fp8_refusal(gm: fx.GraphModule, members: list[_Projection]) -> str | None:
    """Why ``cat(W_i)`` with ``cat(S_i)`` would not be the members' FP8 weight, or None."""
    names = ", ".join(m.weight.target for m in members)
    for member in members[:-1]:
        rows = _attr(gm, member.weight).shape[0]
        if rows % TILE:
            return (f"{names}: {member.weight.target} has N = {rows}, not a multiple of {TILE}: "
                    f"its last scale row covers a partial tile, so the concatenated scale grid "
                    f"would scale the next projection's rows with the wrong tiles; left unfused")
    dtypes = [_attr(gm, m.scale).dtype for m in members]
    if len(set(dtypes)) > 1:
        return (f"{names}: their weight_scale_inv dtypes differ "
                f"({', '.join(str(d).removeprefix('torch.') for d in dtypes)}); scales are kept "
                "as stored, so left unfused")
    return None


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


def _concatenate(gm: fx.GraphModule, attrs: list[fx.Node], kind: str,
                 names: dict[str, list[tuple[str, int]]]) -> str:
    """Register ``cat(attrs)`` along dim 0 and record which rows each original holds."""
    tensors = [_attr(gm, a) for a in attrs]
    fused_name = _register(gm, attrs, torch.cat(tensors, dim=0), kind)
    names[fused_name] = [(a.target, t.shape[0]) for a, t in zip(attrs, tensors)]
    return fused_name


def _fuse(gm: fx.GraphModule, members: list[_Projection],
          names: dict[str, list[tuple[str, int]]]) -> None:
    graph = gm.graph
    first = members[0]
    rows = [_attr(gm, m.weight).shape[0] for m in members]
    fused_weight = _concatenate(gm, [m.weight for m in members], "weight", names)
    # An FP8 scale grid is named after its weight, as in the checkpoint:
    # ...fused_q_proj_k_proj_v_proj_weight + _scale_inv.
    extra = {kind: _concatenate(gm, [getattr(m, kind) for m in members], suffix, names)
             for kind, suffix in (("bias", "bias"), ("scale", "weight_scale_inv"))
             if getattr(first, kind) is not None}
    for member in members:  # the originals go, so the module holds each tensor once
        for attr in (member.weight, member.bias, member.scale):
            if attr is not None:
                delattr(*owner_of(gm, attr.target))
    with graph.inserting_before(first_body_node(graph)):
        weight = graph.get_attr(fused_weight)
        extra_nodes = {kind: graph.get_attr(name) for kind, name in extra.items()}
    with graph.inserting_before(first.node):
        # No fake values: this runs last, on real weights, where nothing reads them (and a
        # stamped or loaded graph mixes fake modes).
        if first.kind == "fp8":
            out = graph.call_function(FP8_LINEAR, (first.input, weight, extra_nodes["scale"]))
        elif first.kind == "fp8_quantized":
            out = graph.call_function(FP8_LINEAR_QUANTIZED, (
                first.input, first.x_scale, weight, extra_nodes["scale"], first.node.args[4]))
        elif "bias" in extra_nodes:
            out = graph.call_function(aten.addmm.default, (
                extra_nodes["bias"], first.input, graph.call_function(aten.t.default, (weight,))))
        else:
            out = graph.call_function(aten.mm.default, (
                first.input, graph.call_function(aten.t.default, (weight,))))
        dim = 1 if first.kind == "mm" else _last_dim(first.input)
        start = 0
        for member, width in zip(members, rows):
            piece = graph.call_function(aten.slice.Tensor, (out, dim, start, start + width))
            start += width
            member.node.replace_all_uses_with(piece)
    for member in members:
        transposed_weight = member.node.args[-1] if member.kind == "mm" else None
        graph.erase_node(member.node)
        if transposed_weight is not None:
            graph.erase_node(transposed_weight)
        for attr in (member.weight, member.bias, member.scale):
            if attr is not None:
                graph.erase_node(attr)


def _last_dim(x: fx.Node) -> int:
    """The last dim of an FP8 linear's output (that of its input ``[..., K]``): from the input's
    value or view shape when the graph has them, else -1."""
    value = x.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.dim() - 1
    shape = x.args[1] if is_op(x, NO_COPY_RESHAPE_OPS | {aten.reshape.default}) else None
    if isinstance(shape, (list, tuple)):
        return len(shape) - 1
    return -1


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
