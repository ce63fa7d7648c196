"""Find the integer constants that held per-rank sizes, by propagating the full shapes.

The walk runs the graph on fake tensors as it will be after the rewrite (full parameters, sites
removed). Where a shape-taking op's input grew, the op's size arguments are scaled to match:

* ``view`` / ``reshape``: input and output dims are grouped by equal running products (on the
  old, symbolic shapes); a grown group scales its outermost non-1 output size (heads before
  head_dim), unless the group holds a ``-1``.
* ``expand``: a non-broadcast size that equalled the old input dim takes the new input dim.
* ``split`` / ``split_with_sizes`` / ``slice`` / ``narrow`` along a grown dim: scaled alike.

Anything else must run unchanged on the bigger tensors; if it does not, the error names the node.
"""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from adp_pass.patterns.structure import ATTENTION_CORE_OPS
from adp_pass.plan import ShapeFix, Site

aten = torch.ops.aten

VIEW_SIZE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default}
_SIZED_OPS = VIEW_SIZE_OPS | SPLIT_OPS | {aten.expand.default, aten.slice.Tensor, aten.narrow.default}
_INT_MAX = 2**62


class ShapeFixError(RuntimeError):
    """A node whose shapes cannot be made consistent with the full parameters."""


def _expr(size: Any) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _same(a: Any, b: Any) -> bool:
    return _expr(a) == _expr(b)


def _view_groups(old_in: list, old_out: list) -> list[tuple[list[int], list[int]]]:
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


def _growth(old: list, new: list, dims: list[int]) -> sympy.Rational:
    """How much the product of ``dims`` grew (a number: symbolic factors cancel)."""
    factor = sympy.Integer(1)
    for d in dims:
        if not _same(old[d], new[d]):
            factor *= sympy.simplify(_expr(new[d]) / _expr(old[d]))
    if not factor.is_Rational:
        raise ShapeFixError(f"a symbolic size changed by a non-constant factor {factor}")
    return factor


def _scaled(value: int, factor: sympy.Rational, node: fx.Node) -> int:
    scaled = value * factor
    if not scaled.is_integer:
        raise ShapeFixError(f"{node.name}: size {value} scaled by {factor} is not an integer")
    return int(scaled)


class _Walk:
    def __init__(
        self,
        gm: fx.GraphModule,
        sites: list[Site],
        attr_shapes: dict[str, tuple],
        fix: bool,
        head_growth: int = 1,
    ):
        self.gm = gm
        self.fix = fix
        self.head_growth = head_growth
        self.attr_shapes = attr_shapes
        self.redirect = {s.replaced: s.replacement for s in sites}
        self.rewire = {(n, i): src for s in sites for n, i, src in s.rewire}
        self.skipped = {name for s in sites for name in (s.collective, s.wait) if name}
        self.fixes: list[ShapeFix] = []
        self.copies: list[str] = []
        self.env: dict[str, Any] = {}

    def value(self, node: fx.Node) -> Any:
        return self.env[node.name]

    def run(self) -> dict[str, Any]:
        vals = [n.meta.get("val") for n in self.gm.graph.nodes]
        fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        if fake_mode is None:
            raise ShapeFixError("graph nodes carry no fake-tensor metadata (meta['val'])")
        with fake_mode:
            for node in self.gm.graph.nodes:
                self.env[node.name] = self.evaluate(node)
        return self.env

    def evaluate(self, node: fx.Node) -> Any:
        if node.name in self.redirect:
            return self.env[self.redirect[node.name]]
        if node.op == "placeholder":
            return node.meta["val"]
        if node.op == "get_attr":
            old = node.meta["val"]
            shape = self.attr_shapes.get(node.target)
            if shape is None or tuple(shape) == tuple(old.shape):
                return old
            return torch.empty(shape, dtype=old.dtype, device=old.device)
        if node.op == "output":
            return None
        if node.name in self.skipped:
            return _DEAD
        args = [self.env[self.rewire[(node.name, i)]] if (node.name, i) in self.rewire else a
                for i, a in enumerate(fx.node.map_arg(node.args, self.value))]
        kwargs = fx.node.map_arg(node.kwargs, self.value)
        if _contains_dead(args) or _contains_dead(kwargs):
            return _DEAD  # only feeds a removed collective
        if self.fix and node.target in _SIZED_OPS:
            args = self.fix_sizes(node, args)
        try:
            return node.target(*args, **kwargs)
        except Exception as err:
            if self.fix and node.target is aten.view.default:
                # A per-rank size of 1 (one local kv head) made an expanded tensor viewable;
                # at full size the same reshape has to copy.
                try:
                    value = aten.reshape.default(*args, **kwargs)
                except Exception:
                    pass
                else:
                    self.copies.append(node.name)
                    return value
            raise ShapeFixError(
                f"node {node.name} ({node.target}) fails on the full-size inputs: {err}. The "
                "graph computes a per-rank size in a way the rewrite cannot re-derive"
            ) from err

    def fix_sizes(self, node: fx.Node, args: list) -> list:
        source = node.args[0]
        old_in = list(source.meta["val"].shape)
        new_in = list(args[0].shape)
        if node.target is aten.expand.default and self.head_growth > 1 and _feeds_attention_bias(node):
            # The attention mask, broadcast to the local head count for a fused kernel (CUDA's
            # efficient attention wants [B, H, S, S]): it follows the heads, not its input.
            sizes = list(args[1])
            if len(sizes) == 4 and _is_int(sizes[1]) and sizes[1] > 1:
                self.record(node, 1, 1, sizes[1], sizes[1] * self.head_growth)
                sizes[1] = self.fixes[-1].new
                args[1] = sizes
        if all(_same(a, b) for a, b in zip(old_in, new_in)):
            return args
        target = node.target
        if target in VIEW_SIZE_OPS:
            old_out = list(node.meta["val"].shape)
            sizes = list(args[1])
            for in_dims, out_dims in _view_groups(old_in, old_out):
                factor = _growth(old_in, new_in, in_dims)
                if factor == 1 or any(_is_int(sizes[j]) and sizes[j] == -1 for j in out_dims):
                    continue
                ints = [j for j in out_dims if _is_int(sizes[j])]
                # A size of 1 is the sharded dim only when nothing else can be (one local head).
                j = next((j for j in ints if sizes[j] != 1), ints[0] if ints else None)
                if j is not None:
                    self.record(node, 1, j, sizes[j], _scaled(sizes[j], factor, node))
                    sizes[j] = self.fixes[-1].new
                    continue
                # Heads folded into a symbolic size (batch * local heads, as decomposed
                # attention does): multiply that size by the growth instead.
                j = next((j for j in out_dims if isinstance(sizes[j], torch.SymInt)), None)
                if j is None or not factor.is_integer:
                    raise ShapeFixError(f"{node.name}: no size to scale by {factor} in {sizes}")
                self.record(node, 1, j, 1, int(factor), multiply=True)
                sizes[j] = sizes[j] * int(factor)
            args[1] = sizes
        elif target is aten.expand.default:
            sizes = list(args[1])
            offset = len(sizes) - len(old_in)
            for d, (old, new) in enumerate(zip(old_in, new_in)):
                j = d + offset
                if not _same(old, new) and _is_int(sizes[j]) and _same(sizes[j], old):
                    self.record(node, 1, j, sizes[j], int(new))
                    sizes[j] = int(new)
            args[1] = sizes
        else:
            dim_arg = 1 if target in (aten.slice.Tensor, aten.narrow.default) else 2
            dim = args[dim_arg] if len(args) > dim_arg else 0
            dim = dim % len(old_in)
            if _same(old_in[dim], new_in[dim]):
                return args
            factor = _growth(old_in, new_in, [dim])
            if target in SPLIT_OPS:
                if isinstance(args[1], (list, tuple)):
                    sizes = list(args[1])
                    for j, s in enumerate(sizes):
                        self.record(node, 1, j, s, _scaled(s, factor, node))
                        sizes[j] = self.fixes[-1].new
                    args[1] = sizes
                else:
                    self.record(node, 1, None, args[1], _scaled(args[1], factor, node))
                    args[1] = self.fixes[-1].new
            else:  # slice(x, dim, start, end) / narrow(x, dim, start, length)
                for index in (2, 3):
                    if index < len(args) and _is_int(args[index]) and 0 < args[index] < _INT_MAX:
                        self.record(node, index, None, args[index], _scaled(args[index], factor, node))
                        args[index] = self.fixes[-1].new
        return args

    def record(
        self, node: fx.Node, arg: int, index: int | None, old: int, new: int, multiply: bool = False
    ) -> None:
        fix = ShapeFix(node.name, _target_name(node), arg, index, int(old), int(new), multiply)
        self.fixes.append(fix)


class _Dead:
    """The value of a node that only feeds a removed collective."""


_DEAD = _Dead()


_BIAS_PATH_OPS = VIEW_SIZE_OPS | {aten.expand.default, aten.slice.Tensor, aten._to_copy.default,
                                  aten.clone.default, aten.contiguous.default}


def _feeds_attention_bias(node: fx.Node) -> bool:
    """Whether ``node`` reaches an attention core as its mask/bias (not as q, k or v)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            if user.op == "call_function" and user.target in ATTENTION_CORE_OPS:
                if current in user.args[3:] or current in user.kwargs.values():
                    return True
            elif user.op == "call_function" and user.target in _BIAS_PATH_OPS:
                stack.append(user)
    return False


def _contains_dead(tree: Any) -> bool:
    if isinstance(tree, (list, tuple)):
        return any(_contains_dead(t) for t in tree)
    if isinstance(tree, dict):
        return any(_contains_dead(t) for t in tree.values())
    return tree is _DEAD


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _target_name(node: fx.Node) -> str:
    target = node.target
    if target in (operator.getitem,):
        return "getitem"
    return str(target).replace("aten.", "")


def plan_shape_fixes(
    gm: fx.GraphModule, sites: list[Site], attr_shapes: dict[str, tuple], head_growth: int = 1
) -> tuple[list[ShapeFix], list[str], dict[str, Any]]:
    """The constants to change so ``gm`` runs with attributes of ``attr_shapes`` once ``sites``
    are removed, the ``view`` nodes that must become ``reshape`` (copy) at full size, and the
    live nodes' values after that."""
    walk = _Walk(gm, sites, attr_shapes, fix=True, head_growth=head_growth)
    env = walk.run()
    live = {name: value for name, value in env.items() if value is not _DEAD}
    return walk.fixes, walk.copies, live


def propagate_shapes(gm: fx.GraphModule) -> dict[str, Any]:
    """Every node's fake value for the module's current attributes; raises on a mismatch."""
    shapes = {name: tuple(t.shape) for name, t in (*gm.named_parameters(), *gm.named_buffers())}
    return _Walk(gm, [], shapes, fix=False).run()
