"""The sharding rules: for each op, its output's layout from its inputs' (or a refusal).

Each rule is a small proof that "the op on rank r's local values equals rank r's part of the
op on the full values" for the layouts it returns; :class:`~adp_pass.layouts._Conflict` says
why none exists. Rules get the analysis (``a``) to read input layouts (``a.get``), to ask for a
decision between valid view layouts (``a.decide``) and to grow a broadcast (``a.grow_broadcast``).
The table at the bottom maps ops to rules; pointwise ops (``torch.Tag.pointwise``) share one.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Iterable

import sympy
import torch
import torch.fx as fx

from adp_pass.fp8 import WEIGHT_BLOCK
from adp_pass.fx_vocab import (
    ALL_REDUCE_OPS,
    ATTENTION_CORE_OPS,
    COLLECTIVE_OPS,
    COPY_OPS,
    FP8_LINEAR_OPS,
    RESHAPE_OPS,
    SLICE_OPS,
    SPLIT_OPS,
    TRANSPOSE_OPS,
    WAIT_OPS,
    dim_arg,
)
from adp_pass.layouts import (
    INT_MAX,
    REPLICATED,
    DimLayout,
    Layout,
    Segment,
    _Conflict,
    _divides,
    _expr,
    _is_concrete,
    _layout,
    _plain,
    _segments_text,
    _shape,
    _val,
    view_groups,
)

aten = torch.ops.aten


# A partial sum may be copied or cast on its way to the all-reduce (engines cast to fp32).
_PARTIAL_OK = COPY_OPS | {aten.detach.default}
# Same values as the input; a lifted constant's copy is never sharded, so it is never partial.
_PASS_THROUGH = _PARTIAL_OK | {aten.lift_fresh_copy.default}


def _is_pointwise(target: Any) -> bool:
    return torch.Tag.pointwise in getattr(target, "tags", ())


def _deps_of(layouts: Iterable) -> frozenset:
    deps = frozenset()
    for layout in layouts:
        if isinstance(layout, Layout):
            deps |= layout.deps
        elif isinstance(layout, tuple):
            deps |= _deps_of(layout)
    return deps


def _nodes_in(tree: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(tree, lambda n: found.append(n))
    return found


def _replicated_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return REPLICATED
    if isinstance(value, (tuple, list)):
        return tuple(_replicated_like(v) for v in value)
    return None


def _norm_dim(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _op_name(node: fx.Node) -> str:
    return str(node.target).replace("aten.", "")


def _permutation(node: fx.Node) -> list[int]:
    """For each output dim of a transpose/permute/t, the input dim it reads."""
    rank = len(_shape(node))
    if node.target is aten.t.default:
        return list(range(rank))[::-1]
    if node.target is aten.transpose.int:
        a, b = (_norm_dim(d, rank) for d in node.args[1:3])
        perm = list(range(rank))
        perm[a], perm[b] = b, a
        return perm
    return [_norm_dim(d, rank) for d in node.args[1]]


def _tensor_layout(analysis: Any, value: Any) -> Layout:
    layout = analysis.get(value)
    return layout if isinstance(layout, Layout) else REPLICATED


def _refuse_partial(node: fx.Node, layouts: Iterable[Layout]) -> None:
    for layout in layouts:
        if layout.partial:
            raise _Conflict(node, "it uses a partial sum (one rank's addend) before its "
                            "all-reduce; removing the all-reduce would change what it sees",
                            layout.deps)


def rule_pointwise(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    tensors = [v for v in _nodes_in((args, kwargs)) if isinstance(_val(v), torch.Tensor)]
    layouts = [_tensor_layout(a, v) for v in tensors]
    deps = _deps_of(layouts)
    if node.target in _PARTIAL_OK and len(tensors) == 1 and layouts[0].partial:
        return layouts[0]
    _refuse_partial(node, layouts)
    out_shape = _shape(node)
    rank = len(out_shape)
    dims: dict[int, DimLayout] = {}
    for tensor, layout in zip(tensors, layouts):
        offset = rank - len(_shape(tensor))
        for dim, segments in layout.dims:
            if _expr(_shape(tensor)[dim]) != _expr(out_shape[dim + offset]):
                raise _Conflict(node, f"{tensor.name}'s sharded dim {dim} broadcasts",
                                deps)
            if dims.setdefault(dim + offset, segments) != segments:
                raise _Conflict(node, f"its inputs are sharded differently along dim "
                                f"{dim + offset}", deps)
    for out_dim, segments in dims.items():
        for tensor, layout in zip(tensors, layouts):
            dim = out_dim - (rank - len(_shape(tensor)))
            if dim < 0 or layout.at(dim) is not None or _expr(_shape(tensor)[dim]) == 1:
                continue
            a.grow_broadcast(node, tensor, dim, segments, deps)
    return _layout(dims, deps)


def rule_view(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    source = args[0]
    layout = _tensor_layout(a, source)
    if layout.partial or not layout.dims:
        return layout
    if len(layout.dims) > 1:
        raise _Conflict(node, f"it reshapes a tensor sharded along several dims "
                        f"({layout.describe()})", layout.deps)
    old_in, old_out = _shape(source), _shape(node)
    (dim, segments), = layout.dims
    inner_in = math.prod(_expr(s) for s in old_in[dim + 1:])
    options = []
    for out in range(len(old_out)):
        inner = math.prod(_expr(s) for s in old_out[out + 1:])
        if len(segments) > 1:  # fused blocks pass only through a view that keeps the dim whole
            if sympy.simplify(inner - inner_in) == 0 and _expr(old_out[out]) == _expr(old_in[dim]):
                options.append((out, segments))
            continue
        # The rank digit has stride ``block`` in the flattened tensor; it can sit in output dim
        # ``out`` if the dims inside ``out`` fill a whole number of it and ``out`` the rest.
        block = _expr(segments[0].block) * inner_in
        if _divides(inner, block) and _divides(block / inner, old_out[out]):
            options.append((out, (Segment(_plain(old_out[out]), _plain(block / inner)),)))
    if not options:
        raise _Conflict(node, f"no output dim can hold the rank blocks of input dim {dim} "
                        f"({_segments_text(segments)}) in view {old_in} -> {old_out}",
                        layout.deps)
    # Most likely first: the output dims paired with ``dim`` by the view's products, then
    # concrete sizes (heads) before symbolic ones (batch, sequence), then outermost.
    home = next((outs for ins, outs in view_groups(old_in, old_out) if dim in ins), [])
    options.sort(key=lambda o: (o[0] not in home, not _is_concrete(old_out[o[0]]), o[0]))
    signature = (tuple(map(str, old_in)), tuple(map(str, old_out)), layout.dims)
    (out, segments), deps = a.decide(node, signature, options, layout.deps)
    return _layout({out: segments}, deps)


def rule_permute(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    if layout.partial:
        return layout
    perm = _permutation(node)
    return _layout({o: layout.at(i) for o, i in enumerate(perm) if layout.at(i)}, layout.deps)


def rule_unsqueeze(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    _refuse_partial(node, [layout])
    at = _norm_dim(args[1], len(_shape(node)))
    return _layout({d + (d >= at): s for d, s in layout.dims}, layout.deps)


def rule_squeeze(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    _refuse_partial(node, [layout])
    old = _shape(args[0])
    if node.target is aten.squeeze.default:
        dropped = [d for d, s in enumerate(old) if _expr(s) == 1]
    else:
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        dropped = [_norm_dim(d, len(old)) for d in dims if _expr(old[_norm_dim(d, len(old))]) == 1]
    if any(layout.at(d) for d in dropped):
        raise _Conflict(node, "it squeezes a sharded dim of local size 1", layout.deps)
    return _layout({d - sum(x < d for x in dropped): s for d, s in layout.dims}, layout.deps)


def rule_expand(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    source = args[0]
    layout = _tensor_layout(a, source)
    _refuse_partial(node, [layout])
    sizes, old_in = list(args[1]), _shape(source)
    offset = len(sizes) - len(old_in)
    dims = {}
    for dim, segments in layout.dims:
        size = sizes[dim + offset]
        if not (isinstance(size, int) and size == -1) and not isinstance(size, fx.Node) \
                and _expr(size) != _expr(old_in[dim]):
            raise _Conflict(node, f"it broadcasts sharded dim {dim} to {size}", layout.deps)
        dims[dim + offset] = segments
    for (name, dim), segments in a.forced.items():
        if name == node.name:
            dims[dim] = segments
    return _layout(dims, layout.deps)


def _split_layout(node: fx.Node, layout: Layout, dim: int, sizes: list) -> list[Layout]:
    """Layouts of consecutive pieces of ``sizes`` along ``dim`` (which may be sharded)."""
    segments = layout.at(dim)
    if segments is None:
        return [layout] * len(sizes)
    bounds, start = {0: 0}, 0
    for i, seg in enumerate(segments):
        start += int(seg.length)
        bounds[start] = i + 1
    pieces, start = [], 0
    for size in sizes:
        end = start + int(size)
        if start not in bounds or end not in bounds:
            raise _Conflict(node, f"it cuts sharded dim {dim} at {start}:{end}, inside a rank "
                            f"block ({_segments_text(segments)})", layout.deps)
        dims = dict(layout.dims)
        dims[dim] = segments[bounds[start]:bounds[end]]
        pieces.append(_layout(dims, layout.deps))
        start = end
    return pieces


def rule_split(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> tuple:
    layout = _tensor_layout(a, args[0])
    _refuse_partial(node, [layout])
    dim = _norm_dim(dim_arg(node, 2), len(_shape(args[0])))
    sizes = [piece.shape[dim] for piece in node.meta["val"]]
    return tuple(_split_layout(node, layout, dim, sizes))


def rule_slice(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    _refuse_partial(node, [layout])
    old = _shape(args[0])
    dim = _norm_dim(dim_arg(node, 1), len(old))
    if layout.at(dim) is None:
        return layout
    if node.target is aten.narrow.default:
        start, end = int(args[2]), int(args[2]) + int(args[3])
    else:
        start = int(args[2]) if len(args) > 2 and args[2] is not None else 0
        end = int(args[3]) if len(args) > 3 and args[3] is not None else INT_MAX
        step = int(args[4]) if len(args) > 4 else 1
        if step != 1:
            raise _Conflict(node, f"it slices sharded dim {dim} with step {step}", layout.deps)
        length = int(old[dim])
        start, end = min(max(start, 0), length), min(max(end, 0), length)
    pieces = _split_layout(node, layout, dim, [start, end - start])
    return pieces[1]


def rule_cat(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    tensors = [t for t in args[0] if isinstance(t, fx.Node)]
    layouts = [_tensor_layout(a, t) for t in tensors]
    deps = _deps_of(layouts)
    _refuse_partial(node, layouts)
    rank = len(_shape(node))
    dim = _norm_dim(dim_arg(node, 1), rank)
    others = [{d: s for d, s in l.dims if d != dim} for l in layouts]
    if any(o != others[0] for o in others):
        raise _Conflict(node, "its inputs are sharded differently", deps)
    along = [l.at(dim) for l in layouts]
    dims = dict(others[0])
    if any(s is not None for s in along):
        if any(s is None for s in along):
            raise _Conflict(node, f"it joins sharded and replicated tensors along dim {dim}", deps)
        dims[dim] = tuple(seg for s in along for seg in s)
    return _layout(dims, deps)


def _contract(node: fx.Node, ka: DimLayout | None, kb: DimLayout | None, deps) -> bool:
    """Whether contracting dims with these layouts gives a partial sum (both sharded alike)."""
    if ka is None and kb is None:
        return False
    if ka != kb:
        raise _Conflict(node, "it contracts a sharded dim with one sharded differently (or "
                        "replicated)", deps)
    return True


def _check_bias(node: fx.Node, bias: Layout | None, bias_rank: int, partial: bool,
                columns: DimLayout | None, deps) -> None:
    """A bias is added once: never to each rank's partial sum, and sharded like the columns."""
    if bias is None:
        return
    if partial:
        raise _Conflict(node, "it adds a bias to each rank's partial sum", deps)
    if bias.at(bias_rank - 1) != columns:
        raise _Conflict(node, "its bias is sharded unlike its output columns", deps)


def _matmul_layout(node, la: Layout, lb: Layout, batch: int, deps, bias: Layout | None = None,
                   bias_rank: int = 1):
    """``a[..., M, K] @ b[..., K, N] (+ bias)``, ``batch`` leading dims that must agree."""
    _refuse_partial(node, [la, lb] + ([bias] if bias else []))
    rank = batch + 2
    dims = {}
    for d in range(batch):
        if la.at(d) != lb.at(d):
            raise _Conflict(node, f"its operands are sharded differently along batch dim {d}", deps)
        if la.at(d):
            dims[d] = la.at(d)
    partial = _contract(node, la.at(rank - 1), lb.at(rank - 2), deps)
    if la.at(rank - 2):
        dims[rank - 2] = la.at(rank - 2)
    if lb.at(rank - 1):
        dims[rank - 1] = lb.at(rank - 1)
    if partial and dims:
        raise _Conflict(node, "it is both a partial sum and sharded", deps)
    _check_bias(node, bias, bias_rank, partial, dims.get(rank - 1), deps)
    return _layout(dims, deps, partial)


def rule_mm(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    if node.target is aten.addmm.default:
        bias, x, w = args[:3]
        lbias, bias_rank = _tensor_layout(a, bias), len(_shape(bias))
    else:
        (x, w), lbias, bias_rank = args[:2], None, 1
    lx, lw = _tensor_layout(a, x), _tensor_layout(a, w)
    batch = len(_shape(x)) - 2
    return _matmul_layout(node, lx, lw, batch, _deps_of([lx, lw, lbias]), lbias, bias_rank)


def rule_linear(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    x, w = args[:2]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    lx, lw = _tensor_layout(a, x), _tensor_layout(a, w)
    lbias = _tensor_layout(a, bias) if isinstance(bias, fx.Node) else None
    deps = _deps_of([lx, lw, lbias])
    _refuse_partial(node, [lx, lw])
    rank = len(_shape(x))
    dims, partial = _linear_output(node, lx, lw, rank, deps)
    _check_bias(node, lbias, 1, partial, dims.get(rank - 1), deps)
    return _layout(dims, deps, partial)


def _linear_output(node: fx.Node, lx: Layout, lw: Layout, rank: int, deps
                   ) -> tuple[dict, Any]:
    """``x [..., K] @ W[N, K].T``'s output dims and partial sum from x's and W's layouts (the
    proof shared by ``linear`` and the FP8 linear): W sharded on N shards the last dim; x and W
    sharded alike on K make a partial sum; never both, nor x sharded along two dims."""
    if any(d < rank - 1 for d, _ in lx.dims) and lx.at(rank - 1):
        raise _Conflict(node, "its input is sharded along two dims", deps)
    partial = _contract(node, lx.at(rank - 1), lw.at(1), deps)
    dims = {d: s for d, s in lx.dims if d < rank - 1}
    if lw.at(0):
        dims[rank - 1] = lw.at(0)
    if partial and dims:
        raise _Conflict(node, "it is both a partial sum and sharded", deps)
    return dims, partial


# The FP8 block: one weight_scale_inv per 128 x 128 tile, activations quantized per 128 of K.
_FP8_BLOCK = WEIGHT_BLOCK[0]


def _tiles(node: fx.Node, dim: int, segments: DimLayout | None, deps) -> DimLayout | None:
    """The layout a weight's scale grid must have along ``dim`` when the weight's is
    ``segments``: the same segments counted in 128-tiles. Each rank's block must be whole tiles,
    else its scales would also scale another rank's values (and, along K, its activation groups
    would not be the full tensor's)."""
    if segments is None:
        return None
    tiles = []
    for seg in segments:
        if not all(_is_concrete(v) and int(v) % _FP8_BLOCK == 0
                   for v in (seg.length, seg.block)):
            raise _Conflict(node, f"the weight's part along dim {dim} ({_segments_text(segments)})"
                            f" is not whole {_FP8_BLOCK}-blocks, so its scale tiles cannot be "
                            "split with it", deps, final=True)
        tiles.append(Segment(int(seg.length) // _FP8_BLOCK, int(seg.block) // _FP8_BLOCK))
    return tuple(tiles)


def rule_fp8_linear(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    """``fp8_block_linear(x [..., K], W [N, K], S [N/128, K/128])``: as ``linear`` for x and W
    (W sharded on N: output sharded on its last dim; W and x sharded alike on K: a partial sum);
    the scale grid must be sharded as W is, tile for tile: same dims, same segments in units of
    128, every rank's block whole tiles. Then rank r's tiles are exactly the tiles of its values,
    and (along K) its 128-wide activation groups are the full tensor's groups, so the local
    product is rank r's part (or addend) of the full one."""
    x, w, scale = args[:3]
    lx, lw, ls = _tensor_layout(a, x), _tensor_layout(a, w), _tensor_layout(a, scale)
    deps = _deps_of([lx, lw, ls])
    _refuse_partial(node, [lx, lw, ls])
    for dim in (0, 1):
        want = _tiles(node, dim, lw.at(dim), deps)
        if ls.at(dim) != want:
            have = _segments_text(ls.at(dim)) if ls.at(dim) else "replicated"
            need = _segments_text(want) if want else "replicated"
            raise _Conflict(node, f"its weight_scale_inv {_node_name(scale)} is {have} along dim "
                            f"{dim} but its weight's tiles there are {need}", deps, final=True)
    dims, partial = _linear_output(node, lx, lw, len(_shape(x)), deps)
    return _layout(dims, deps, partial)


def _node_name(value: Any) -> str:
    return value.name if isinstance(value, fx.Node) else repr(value)


def rule_embedding(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    weight, ids = args[:2]
    lw, li = _tensor_layout(a, weight), _tensor_layout(a, ids)
    deps = _deps_of([lw, li])
    if not li.replicated:
        raise _Conflict(node, "its indices are sharded", deps)
    if lw.at(0):  # a vocab shard: each rank adds the rows it holds (masked lookups)
        return Layout(partial=True, deps=deps)
    rank = len(_shape(node))
    return _layout({rank - 1: lw.at(1)} if lw.at(1) else {}, deps)


def rule_reduce(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    _refuse_partial(node, [layout])
    rank = len(_shape(args[0]))
    if node.target in _ALONG_DIM_OPS:
        reduced, keep = [_norm_dim(args[1], rank)], True
    else:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        dims = list(range(rank)) if dims in (None, []) else (
            dims if isinstance(dims, (list, tuple)) else [dims])
        reduced = [_norm_dim(d, rank) for d in dims]
        keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    hit = [d for d in reduced if layout.at(d)]
    if hit:
        raise _Conflict(node, f"it reduces over sharded dim {hit[0]} ({layout.describe()}): "
                        "the full tensor would reduce over every rank's part", layout.deps)
    result = layout if keep else _layout(
        {d - sum(r < d for r in reduced): s for d, s in layout.dims}, layout.deps)
    if isinstance(node.meta["val"], (tuple, list)):  # max.dim / min.dim: values and indices
        return tuple(result for _ in node.meta["val"])
    return result


def rule_attention(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    q, k, v = args[:3]
    lq, lk, lv = (_tensor_layout(a, t) for t in (q, k, v))
    masks = [m for m in _nodes_in((args[3:], kwargs)) if isinstance(_val(m), torch.Tensor)]
    lmasks = [_tensor_layout(a, m) for m in masks]
    deps = _deps_of([lq, lk, lv, *lmasks])
    _refuse_partial(node, [lq, lk, lv, *lmasks])
    heads = len(_shape(q)) - 3
    for name, layout in (("q", lq), ("k", lk), ("v", lv)):
        if any(d != heads for d, _ in layout.dims):
            raise _Conflict(node, f"{name} is sharded along a dim other than the heads "
                            f"({layout.describe()})", deps)
    if lk.at(heads) != lv.at(heads):
        raise _Conflict(node, "k and v are sharded differently", deps)
    sq, sk = lq.at(heads), lk.at(heads)
    if (sq is None) != (sk is None):
        raise _Conflict(node, "q and k/v disagree on whether the heads are sharded", deps)
    if sq is not None:
        (segq,), (segk,) = sq, sk  # fused layouts were split before attention
        nq, nk = _shape(q)[heads], _shape(k)[heads]
        if _expr(segq.length) * _expr(segk.block) != _expr(segk.length) * _expr(segq.block) \
                or _expr(segq.block) * _expr(nk) != _expr(segk.block) * _expr(nq):
            raise _Conflict(node, "q's and k's head blocks do not line up (each rank must "
                            "hold whole GQA groups)", deps)
    for mask, layout in zip(masks, lmasks):
        rank = len(_shape(mask))
        for d, _ in layout.dims:
            if d != rank - 3 or layout.at(d) != sq:
                raise _Conflict(node, f"its mask {mask.name} is sharded unlike the heads", deps)
        if sq is not None and rank >= 3 and layout.at(rank - 3) is None \
                and _expr(_shape(mask)[rank - 3]) != 1:
            a.grow_broadcast(node, mask, rank - 3, sq, deps)
    outputs = node.meta["val"]
    outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    result = []
    for out in outputs:
        if isinstance(out, torch.Tensor) and out.dim() > heads and sq is not None \
                and _expr(out.shape[heads]) == _expr(_shape(q)[heads]):
            result.append(_layout({heads: sq}, deps))
        else:
            result.append(_replicated_like(out))
    return tuple(result) if isinstance(node.meta["val"], (tuple, list)) else result[0]


def rule_getitem(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    layouts = a.get(args[0])
    if isinstance(layouts, tuple):
        return layouts[args[1]]
    return _replicated_like(_val(node))


def rule_like(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    """``zeros_like(x)`` and friends: a fresh tensor of x's shape, laid out like x."""
    layout = _tensor_layout(a, args[0])
    return Layout(layout.dims, False, layout.deps)


def rule_sym_size(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> None:
    layout = _tensor_layout(a, args[0])
    if layout.at(_norm_dim(args[1], len(_shape(args[0])))):
        raise _Conflict(node, "it reads the size of a sharded dim", layout.deps)
    return None


def rule_collective(a: Any, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    if node.target in WAIT_OPS or layout.replicated:
        return layout
    if layout.partial and node.target in ALL_REDUCE_OPS and args[1] == "sum":
        # A kept all-reduce (over the group the weights are regrouped to) completes the sum.
        return Layout((), False, layout.deps)
    raise _Conflict(node, f"a collective that stays in the graph reads {args[0].name}, which "
                    f"is {layout.describe()}", layout.deps)


_ALONG_DIM_OPS = {aten._softmax.default, aten._log_softmax.default, aten.cumsum.default}
for _name, _overload in (("softmax", "int"), ("log_softmax", "int"), ("_safe_softmax", "default")):
    if hasattr(aten, _name):
        _ALONG_DIM_OPS.add(getattr(getattr(aten, _name), _overload))
_REDUCE_OPS = {
    op for name, overload in (
        ("mean", "dim"), ("sum", "dim_IntList"), ("mean", "default"), ("sum", "default"), ("amax", "default"), ("amin", "default"),
        ("var", "correction"), ("std", "correction"), ("any", "dim"), ("all", "dim"),
        ("argmax", "default"), ("argmin", "default"), ("max", "dim"), ("min", "dim"),
        ("logsumexp", "default"), ("prod", "dim_int"),
    ) if hasattr(aten, name) and hasattr(getattr(aten, name), overload)
    for op in [getattr(getattr(aten, name), overload)]
}
_LIKE_OPS = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
             aten.full_like.default, aten.rand_like.default, aten.randn_like.default}

_RULES: dict[Any, Callable] = {
    **{op: rule_view for op in RESHAPE_OPS},
    **{op: rule_permute for op in TRANSPOSE_OPS},
    aten.unsqueeze.default: rule_unsqueeze,
    aten.squeeze.dim: rule_squeeze, aten.squeeze.default: rule_squeeze,
    aten.expand.default: rule_expand,
    **{op: rule_split for op in SPLIT_OPS},
    **{op: rule_slice for op in SLICE_OPS},
    aten.cat.default: rule_cat,
    aten.mm.default: rule_mm, aten.addmm.default: rule_mm, aten.bmm.default: rule_mm,
    aten.linear.default: rule_linear,
    **{op: rule_fp8_linear for op in FP8_LINEAR_OPS},
    aten.embedding.default: rule_embedding,
    **{op: rule_reduce for op in _REDUCE_OPS | _ALONG_DIM_OPS},
    **{op: rule_attention for op in ATTENTION_CORE_OPS},
    **{op: rule_like for op in _LIKE_OPS},
    operator.getitem: rule_getitem,
    aten.sym_size.int: rule_sym_size,
    **{op: rule_collective for op in set(COLLECTIVE_OPS) | set(WAIT_OPS)},
    **{op: rule_pointwise for op in _PASS_THROUGH},
}
if hasattr(aten, "squeeze") and hasattr(aten.squeeze, "dims"):
    _RULES[aten.squeeze.dims] = rule_squeeze


def _rule_for(target: Any) -> Callable | None:
    rule = _RULES.get(target)
    if rule is None and _is_pointwise(target):
        return rule_pointwise
    return rule



def _broadcast_source(node: fx.Node, dim: int) -> tuple[str, int] | None:
    """The ``expand`` that made ``node``'s ``dim`` from size 1, walking back through ops that
    keep that dim where it is."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target is aten.expand.default:
            source = node.args[0]
            offset = len(_shape(node)) - len(_shape(source))
            if dim < offset or _expr(_shape(source)[dim - offset]) == 1:
                return node.name, dim
            node, dim = source, dim - offset
        elif node.target in _PASS_THROUGH or _is_pointwise(node.target):
            tensors = [a for a in _nodes_in(node.args) if isinstance(_val(a), torch.Tensor)]
            growing = [a for a in tensors if len(_shape(a)) == len(_shape(node))
                       and _expr(_shape(a)[dim]) != 1]
            if len(growing) != 1:
                return None
            node = growing[0]
        elif node.target in SLICE_OPS:
            if _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(_shape(node))) == dim:
                return None
            node = node.args[0]
        elif node.target is aten.unsqueeze.default:
            at = _norm_dim(node.args[1], len(_shape(node)))
            if at == dim:
                return None
            node, dim = node.args[0], dim - (at < dim)
        elif node.target in TRANSPOSE_OPS:
            node, dim = node.args[0], _permutation(node)[dim]
        else:
            return None
    return None


