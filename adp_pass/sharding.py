"""Follow the TP-sharded axis through the graph: which dim of every tensor carries it, and how.

The rewrite gives every sharded parameter its full size; each tensor computed from one then
grows along some dims. Which dims is not guessed from which constant looks divisible: it is
*derived* from the sharded parameters forward, op by op, with rules that are each a small
proof that "the op on rank r's local values equals rank r's part of the op on the full values".

A tensor's layout is, per sharded dim, a list of segments. A segment of local length ``L`` with
block ``B`` (``L = o * B``) holds, in the full tensor, ``tp * L`` entries laid out as
``o`` runs of ``tp`` rank blocks of ``B``: local index ``a * B + j`` of rank ``r`` is full index
``a * tp * B + r * B + j``. A plain column shard is one segment with ``o = 1``; a fused
``q|k|v`` or ``gate|up`` output has one segment per fused block. A *partial* tensor holds one
rank's addend of a sum (a row-parallel linear before its all-reduce).

A ``view`` can place the rank digit in more than one output dim (one local head: ``[b, t, D]``
viewed as ``[b, t, 1, D]`` grows either the 1 or the D; both are valid memory layouts). Such a
choice is a *decision*: the walk takes the most likely option first and, when a later op proves
it inconsistent (a norm over the head dim, attention contracting it), goes back and takes the
next. Whatever cannot be made consistent is refused with :class:`ShapeFixError` naming the node.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import sympy
import torch
import torch.fx as fx

from adp_pass.errors import AdpError
from adp_pass.patterns.structure import ATTENTION_CORE_OPS, COLLECTIVE_OPS, WAIT_OPS
from adp_pass.plan import ShardedWeight, Site

aten = torch.ops.aten

VIEW_SIZE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default}
SLICE_OPS = {aten.slice.Tensor, aten.narrow.default}
SIZED_OPS = VIEW_SIZE_OPS | SPLIT_OPS | SLICE_OPS | {aten.expand.default}
INT_MAX = 2**62
_MAX_RETRIES = 500


class ShapeFixError(AdpError, RuntimeError):
    """A node whose sharded axis cannot be followed, so the rewrite cannot prove its sizes."""

    default_hint = ("write per-rank sizes as a plain TP layer does (view(.., -1, head_dim)), or "
                    "report the graph (adp rewrite --out DIR saves it)")


# ----------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Segment:
    length: Any  # local size (an int, or a sympy expression for a symbolic dim)
    block: Any  # each rank's contiguous block inside it


DimLayout = tuple[Segment, ...]


@dataclass(frozen=True)
class Layout:
    dims: tuple[tuple[int, DimLayout], ...] = ()
    partial: bool = False
    deps: frozenset = frozenset()  # names of the view decisions this layout rests on

    def at(self, dim: int) -> DimLayout | None:
        return dict(self.dims).get(dim)

    @property
    def replicated(self) -> bool:
        return not self.dims and not self.partial

    def same(self, other: "Layout") -> bool:
        return self.dims == other.dims and self.partial == other.partial

    def describe(self) -> str:
        if self.partial:
            return "a partial sum"
        if not self.dims:
            return "replicated"
        return ", ".join(f"dim {d} sharded ({_segments_text(s)})" for d, s in self.dims)


REPLICATED = Layout()


def _layout(dims: dict[int, DimLayout], deps: frozenset, partial: bool = False) -> Layout:
    return Layout(tuple(sorted(dims.items())), partial, deps)


def _segments_text(segments: DimLayout) -> str:
    return " | ".join(f"{s.length} in blocks of {s.block}" for s in segments)


def grown_shape(shape: Iterable, layout: Layout, growth: int) -> list:
    """The shape a tensor has after the rewrite: its sharded dims ``growth`` times larger."""
    shape = list(shape)
    for dim, _ in layout.dims:
        shape[dim] = shape[dim] * growth
    return shape


def expected_shape(old: torch.Tensor, new: torch.Tensor, layout: Layout, growth: int) -> list | None:
    """The shape ``new`` should have (``old``'s, grown as ``layout`` says), or None if it has
    it. Symbolic sizes are compared as expressions, or skipped against concrete ones."""
    want = list(old.shape) if layout.partial else grown_shape(old.shape, layout, growth)
    have = list(new.shape)
    if len(want) != len(have):
        return want
    for w, h in zip(want, have):
        symbolic = isinstance(w, torch.SymInt) or isinstance(h, torch.SymInt)
        if symbolic and isinstance(w, torch.SymInt) and isinstance(h, torch.SymInt):
            if _expr(w) != _expr(h):
                return want
        elif not symbolic and int(w) != int(h):
            return want
    return None


def local_part(
    full: torch.Tensor, layout: Layout, rank: int, growth: int, symbols: dict | None = None
) -> torch.Tensor:
    """Rank ``rank``'s local tensor inside the full one (the inverse of the growth).
    ``symbols`` gives values to symbolic sizes (batch, sequence) in the layout."""
    for dim, segments in layout.dims:
        pieces, offset = [], 0
        for seg in segments:
            length, block = (int(_expr(v).subs(symbols or {})) for v in (seg.length, seg.block))
            part = full.narrow(dim, offset, length * growth)
            shape = (*part.shape[:dim], length // block, growth, block, *part.shape[dim + 1:])
            pieces.append(part.reshape(shape).select(dim + 1, rank).flatten(dim, dim + 1))
            offset += length * growth
        full = torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]
    return full


def _expr(size: Any) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return size.node.expr
    if isinstance(size, sympy.Expr):
        return size
    return sympy.Integer(int(size))


def _divides(small: Any, big: Any) -> bool:
    """Whether ``small`` provably divides ``big`` (symbols are positive integers)."""
    quotient = sympy.simplify(_expr(big) / _expr(small))
    return bool(quotient.is_integer) and bool(quotient.is_positive)


def _is_concrete(size: Any) -> bool:
    return _expr(size).is_number


def _plain(size: Any) -> Any:
    """An int where the size is a number, else the sympy expression."""
    expr = sympy.simplify(_expr(size))
    return int(expr) if expr.is_number else expr


# ----------------------------------------------------------------------------- the walk
class _Conflict(Exception):
    def __init__(self, node: fx.Node, reason: str, deps: frozenset, final: bool = False) -> None:
        super().__init__(reason)
        self.node, self.reason, self.deps = node, reason, deps
        self.final = final  # no other choice of layouts can help (an op without a rule)


class _Restart(Exception):
    """A constraint found later changed an earlier node: walk again from ``node``."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node


@dataclass
class _Decision:
    signature: tuple
    options: list  # per option: {out dim: DimLayout}


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node: fx.Node) -> list:
    return list(node.meta["val"].shape)


class ShardingAnalysis:
    """Layouts of every node of ``gm`` once ``sites`` are removed and ``weights`` are full.

    ``run()`` returns ``{node name: Layout | tuple of Layouts | None}`` for the nodes that
    stay alive; ``None`` for non-tensors. Nodes whose only use is a removed collective are
    left out (they die in the rewrite).
    """

    def __init__(
        self, gm: fx.GraphModule, sites: list[Site], weights: dict[str, ShardedWeight],
        growth: int,
    ) -> None:
        self.gm, self.growth = gm, growth
        self.weights = weights
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.redirect = {s.replaced: s.replacement for s in sites}
        self.rewire = {(n, i): src for s in sites for n, i, src in s.rewire}
        self.layouts: dict[str, Any] = {}
        self.choices: dict[str, int] = {}
        self.decisions: dict[str, _Decision] = {}
        self.preferred: dict[tuple, int] = {}  # a decision that worked, for look-alike nodes
        self.forced: dict[tuple[str, int], DimLayout] = {}  # broadcast dims that must grow
        self.flips = 0  # decisions taken back

    # -------------------------------------------------------------- graph after the rewrite
    def inputs(self, node: fx.Node) -> tuple[tuple, dict]:
        """``node``'s args and kwargs as the rewritten graph has them (rewired)."""
        args = list(node.args)
        for index in range(len(args)):
            source = self.rewire.get((node.name, index))
            if source is not None:
                args[index] = self.nodes[source]
        return tuple(args), dict(node.kwargs)

    def live_nodes(self) -> list[fx.Node]:
        """Nodes the rewritten graph still computes, in graph order (plus the replaced nodes,
        which stand for the completed value of their replacement)."""
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        live, stack = set(), [output]
        while stack:
            node = stack.pop()
            if node.name in live:
                continue
            live.add(node.name)
            if node.name in self.redirect:
                stack.append(self.nodes[self.redirect[node.name]])
                continue
            args, kwargs = self.inputs(node)
            stack.extend(_nodes_in((args, kwargs)))
        return [n for n in self.gm.graph.nodes if n.name in live]

    # -------------------------------------------------------------- driver
    def run(self) -> dict[str, Any]:
        order = self.live_nodes()
        position = {n.name: i for i, n in enumerate(order)}
        i, retries, first = 0, 0, None
        while i < len(order):
            node = order[i]
            try:
                self.layouts[node.name] = self.layout_of(node)
                i += 1
                continue
            except _Restart as restart:
                i = position[restart.node]
            except _Conflict as conflict:
                first = first or conflict  # the first one names the real problem
                flipped = None if conflict.final else self.backtrack(conflict, position)
                if flipped is None:
                    raise ShapeFixError(self.message(first if not conflict.final
                                                     else conflict)) from None
                i = position[flipped]
            retries += 1
            if retries > _MAX_RETRIES:
                raise ShapeFixError(
                    f"no consistent layout of the sharded axis found after {_MAX_RETRIES} "
                    "tries; the graph's shapes cannot be proven"
                )
        return self.layouts

    def backtrack(self, conflict: _Conflict, position: dict[str, int]) -> str | None:
        """Take the next option of the latest decision the conflict rests on."""
        for name in sorted(conflict.deps, key=position.__getitem__, reverse=True):
            decision = self.decisions[name]
            choice = self.choices.get(name, 0) + 1
            if choice < len(decision.options):
                self.flips += 1
                self.choices[name] = choice
                self.preferred[decision.signature] = choice
                for later in [d for d in self.choices if position[d] > position[name]]:
                    del self.choices[later]
                return name
            self.choices.pop(name, None)
        return None

    def message(self, conflict: _Conflict) -> str:
        node = conflict.node
        return (
            f"cannot follow the sharded axis through node {node.name} ({_op_name(node)}): "
            f"{conflict.reason}. The rewrite would have to guess a per-rank size here, so it "
            "refuses"
        )

    def decide(self, node: fx.Node, signature: tuple, options: list, deps: frozenset):
        """Pick one of several valid layouts for ``node``'s output (see the module doc)."""
        if len(options) == 1:
            return options[0], deps
        self.decisions[node.name] = _Decision(signature, options)
        if node.name not in self.choices:
            self.choices[node.name] = min(self.preferred.get(signature, 0), len(options) - 1)
        return options[self.choices[node.name]], deps | {node.name}

    # -------------------------------------------------------------- per node
    def get(self, value: Any) -> Any:
        if isinstance(value, fx.Node):
            return self.layouts[value.name]
        return None

    def layout_of(self, node: fx.Node) -> Any:
        if node.name in self.redirect:
            return self.completed(node)
        if node.op == "placeholder":
            return REPLICATED if isinstance(_val(node), torch.Tensor) else None
        if node.op == "get_attr":
            return self.parameter_layout(node)
        if node.op == "output":
            args, _ = self.inputs(node)
            for value in _nodes_in(args):
                layout = self.get(value)
                if isinstance(layout, Layout) and not layout.replicated:
                    raise _Conflict(node, f"the graph returns {value.name}, which is "
                                    f"{layout.describe()}", layout.deps)
            return None
        if node.op != "call_function":
            raise _Conflict(node, f"{node.op} nodes are not supported", frozenset())
        args, kwargs = self.inputs(node)
        in_layouts = [self.get(v) for v in _nodes_in((args, kwargs))]
        touched = any(isinstance(l, Layout) and not l.replicated for l in in_layouts)
        forced = any(key[0] == node.name for key in self.forced)
        if not touched and not forced and node.target is not operator.getitem:
            return _replicated_like(_val(node))
        rule = _rule_for(node.target)
        if rule is None:
            sharded = next(v for v in _nodes_in((args, kwargs))
                           if isinstance(self.get(v), Layout) and not self.get(v).replicated)
            raise _Conflict(node, f"no sharding rule for this op, and its input {sharded.name} "
                            f"is {self.get(sharded).describe()}", _deps_of(in_layouts),
                            final=True)
        return rule(self, node, args, kwargs)

    def completed(self, node: fx.Node) -> Layout:
        """A removed collective's result: the replacement's value, now whole on every rank."""
        replacement = self.nodes[self.redirect[node.name]]
        layout = self.layouts[replacement.name]
        want, have = _shape(node), grown_shape(_shape(replacement), layout, self.growth)
        if layout.partial:
            have = _shape(replacement)
        if len(want) != len(have) or any(_expr(a) != _expr(b) for a, b in zip(want, have)):
            raise _Conflict(node, f"the removed collective's result has shape {want} but its "
                            f"replacement {replacement.name} becomes {have}", layout.deps)
        return Layout(deps=layout.deps)

    def parameter_layout(self, node: fx.Node) -> Layout:
        weight = self.weights.get(node.target)
        if weight is None:
            return _replicated_like(_val(node))
        local = _shape(node)[weight.dim]
        segments = weight.segments or (int(local),)
        return _layout({weight.dim: tuple(Segment(int(s), int(s)) for s in segments)}, frozenset())

    # -------------------------------------------------------------- broadcast growth
    def grow_broadcast(self, node: fx.Node, operand: fx.Node, dim: int, want: DimLayout,
                       deps: frozenset) -> None:
        """``operand`` meets a sharded tensor along ``dim`` with the same local size but is
        replicated there. Fine only if that size came from broadcasting (an ``expand`` of a
        size-1 dim, e.g. an attention mask expanded to the local head count): then the
        expand grows with the heads. Otherwise the graph holds a per-rank size we cannot fix."""
        source = _broadcast_source(operand, dim)
        if source is None or source in self.forced:
            raise _Conflict(
                node, f"{operand.name} is replicated along dim {dim} (size "
                f"{_shape(operand)[dim]}) but meets a tensor sharded there, and its size there "
                "does not come from broadcasting", deps)
        self.forced[source] = want
        raise _Restart(source[0])


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
        elif node.target in (aten.slice.Tensor, aten.narrow.default):
            if _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(_shape(node))) == dim:
                return None
            node = node.args[0]
        elif node.target is aten.unsqueeze.default:
            at = _norm_dim(node.args[1], len(_shape(node)))
            if at == dim:
                return None
            node, dim = node.args[0], dim - (at < dim)
        elif node.target in (aten.transpose.int, aten.permute.default, aten.t.default):
            node, dim = node.args[0], _permutation(node)[dim]
        else:
            return None
    return None


# ----------------------------------------------------------------------------- rules
_PASS_THROUGH = {
    aten._to_copy.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
    aten.detach.default, aten.lift_fresh_copy.default,
}
# A partial sum may be copied or cast on its way to the all-reduce (engines cast to fp32).
_PARTIAL_OK = {aten.clone.default, aten.alias.default, aten.contiguous.default,
               aten.detach.default, aten._to_copy.default}


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


def _tensor_layout(analysis: ShardingAnalysis, value: Any) -> Layout:
    layout = analysis.get(value)
    return layout if isinstance(layout, Layout) else REPLICATED


def _refuse_partial(node: fx.Node, layouts: Iterable[Layout]) -> None:
    for layout in layouts:
        if layout.partial:
            raise _Conflict(node, "it uses a partial sum (one rank's addend) before its "
                            "all-reduce; removing the all-reduce would change what it sees",
                            layout.deps)


def rule_pointwise(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
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


def rule_view(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
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


def rule_permute(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    if layout.partial:
        return layout
    perm = _permutation(node)
    return _layout({o: layout.at(i) for o, i in enumerate(perm) if layout.at(i)}, layout.deps)


def rule_unsqueeze(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    _refuse_partial(node, [layout])
    at = _norm_dim(args[1], len(_shape(node)))
    return _layout({d + (d >= at): s for d, s in layout.dims}, layout.deps)


def rule_squeeze(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
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


def rule_expand(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
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


def rule_split(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> tuple:
    layout = _tensor_layout(a, args[0])
    _refuse_partial(node, [layout])
    sizes = [_shape_of(v)[_norm_dim(_dim_arg(node, args, 2), len(_shape(args[0])))]
             for v in node.meta["val"]]
    dim = _norm_dim(_dim_arg(node, args, 2), len(_shape(args[0])))
    return tuple(_split_layout(node, layout, dim, sizes))


def rule_slice(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    _refuse_partial(node, [layout])
    old = _shape(args[0])
    dim = _norm_dim(_dim_arg(node, args, 1), len(old))
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


def rule_cat(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    tensors = [t for t in args[0] if isinstance(t, fx.Node)]
    layouts = [_tensor_layout(a, t) for t in tensors]
    deps = _deps_of(layouts)
    _refuse_partial(node, layouts)
    rank = len(_shape(node))
    dim = _norm_dim(_dim_arg(node, args, 1), rank)
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


def _matmul_layout(node, la: Layout, lb: Layout, batch: int, deps, bias: Layout | None = None):
    """``a[..., M, K] @ b[..., K, N]``, ``batch`` leading dims that must agree."""
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
    if bias is not None and (partial or bias.at(0) != dims.get(rank - 1)):
        if partial and not bias.dims:
            raise _Conflict(node, "it adds a bias to each rank's partial sum", deps)
        if bias.at(0) != dims.get(rank - 1):
            raise _Conflict(node, "its bias is sharded unlike its output columns", deps)
    return _layout(dims, deps, partial)


def _transposed(layout: Layout, rank: int) -> Layout:
    perm = {rank - 1: rank - 2, rank - 2: rank - 1}
    return _layout({perm.get(d, d): s for d, s in layout.dims}, layout.deps, layout.partial)


def rule_mm(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    if node.target is aten.addmm.default:
        bias, x, w = args[:3]
        lbias = _tensor_layout(a, bias)
        lbias = Layout(((0, lbias.at(len(_shape(bias)) - 1)),), deps=lbias.deps) \
            if lbias.at(len(_shape(bias)) - 1) else lbias
    else:
        (x, w), lbias = args[:2], None
    lx, lw = _tensor_layout(a, x), _tensor_layout(a, w)
    batch = len(_shape(x)) - 2
    return _matmul_layout(node, lx, lw, batch, _deps_of([lx, lw, lbias]), lbias)


def rule_linear(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    x, w = args[:2]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    lx, lw = _tensor_layout(a, x), _tensor_layout(a, w)
    lbias = _tensor_layout(a, bias) if isinstance(bias, fx.Node) else None
    deps = _deps_of([lx, lw, lbias])
    _refuse_partial(node, [lx, lw])
    rank = len(_shape(x))
    if any(d < rank - 1 for d, _ in lx.dims) and lx.at(rank - 1):
        raise _Conflict(node, "its input is sharded along two dims", deps)
    partial = _contract(node, lx.at(rank - 1), lw.at(1), deps)
    dims = {d: s for d, s in lx.dims if d < rank - 1}
    if lw.at(0):
        dims[rank - 1] = lw.at(0)
    if partial and (dims or (lbias is not None)):
        raise _Conflict(node, "it is both a partial sum and sharded, or adds a bias to each "
                        "rank's partial sum", deps)
    if lbias is not None and lbias.at(0) != dims.get(rank - 1):
        raise _Conflict(node, "its bias is sharded unlike its output columns", deps)
    return _layout(dims, deps, partial)


def rule_embedding(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    weight, ids = args[:2]
    lw, li = _tensor_layout(a, weight), _tensor_layout(a, ids)
    deps = _deps_of([lw, li])
    if not li.replicated:
        raise _Conflict(node, "its indices are sharded", deps)
    if lw.at(0):  # a vocab shard: each rank adds the rows it holds (masked lookups)
        return Layout(partial=True, deps=deps)
    rank = len(_shape(node))
    return _layout({rank - 1: lw.at(1)} if lw.at(1) else {}, deps)


def rule_reduce(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
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


def rule_attention(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Any:
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


def rule_getitem(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    layouts = a.get(args[0])
    if isinstance(layouts, tuple):
        return layouts[args[1]]
    return _replicated_like(_val(node))


def rule_like(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    """``zeros_like(x)`` and friends: a fresh tensor of x's shape, laid out like x."""
    layout = _tensor_layout(a, args[0])
    return Layout(layout.dims, False, layout.deps)


def rule_sym_size(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> None:
    layout = _tensor_layout(a, args[0])
    if layout.at(_norm_dim(args[1], len(_shape(args[0])))):
        raise _Conflict(node, "it reads the size of a sharded dim", layout.deps)
    return None


def rule_collective(a: ShardingAnalysis, node: fx.Node, args: tuple, kwargs: dict) -> Layout:
    layout = _tensor_layout(a, args[0])
    if node.target in WAIT_OPS:
        return layout
    raise _Conflict(node, f"a collective that stays in the graph reads {args[0].name}, which "
                    f"is {layout.describe()}", layout.deps)


def _dim_arg(node: fx.Node, args: tuple, index: int) -> int:
    if len(args) > index:
        return args[index]
    return node.kwargs.get("dim", 0)


def _shape_of(value: Any) -> list:
    return list(value.shape)


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
    **{op: rule_view for op in VIEW_SIZE_OPS},
    aten.transpose.int: rule_permute, aten.permute.default: rule_permute,
    aten.t.default: rule_permute,
    aten.unsqueeze.default: rule_unsqueeze,
    aten.squeeze.dim: rule_squeeze, aten.squeeze.default: rule_squeeze,
    aten.expand.default: rule_expand,
    **{op: rule_split for op in SPLIT_OPS},
    **{op: rule_slice for op in SLICE_OPS},
    aten.cat.default: rule_cat,
    aten.mm.default: rule_mm, aten.addmm.default: rule_mm, aten.bmm.default: rule_mm,
    aten.linear.default: rule_linear,
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


# ----------------------------------------------------------------------------- view groups
def view_groups(old_in: list, old_out: list) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims whose products match (view semantics)."""
    in_products, out_products, acc = [], [], sympy.Integer(1)
    for size in old_in:
        acc = acc * _expr(size)
        in_products.append(sympy.expand(acc))
    acc = sympy.Integer(1)
    for size in old_out:
        acc = acc * _expr(size)
        out_products.append(sympy.expand(acc))
    groups, last_in, last_out = [], -1, -1
    for i, product in enumerate(in_products):
        for j in range(last_out + 1, len(out_products)):
            if out_products[j] == product:
                groups.append((list(range(last_in + 1, i + 1)), list(range(last_out + 1, j + 1))))
                last_in, last_out = i, j
                break
    if last_in < len(old_in) - 1 or last_out < len(old_out) - 1:
        groups.append(
            (list(range(last_in + 1, len(old_in))), list(range(last_out + 1, len(old_out))))
        )
    return groups

