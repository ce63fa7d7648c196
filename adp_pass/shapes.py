"""Shape constants to fix, derived from the sharding, then proven on fake tensors.

1. :class:`~adp_pass.sharding.ShardingAnalysis` follows the sharded axis from the sharded
   parameters through the graph: every live node gets a layout (which dims grow, in which
   rank blocks), or the graph is refused with a :class:`ShapeFixError` naming the node.
2. A size argument changes only where the layout says its output dim grows: a ``view`` /
   ``reshape`` / ``expand`` size of that dim (a constant is multiplied by the growth; ``-1``
   stays; a symbolic size gets a ``mul`` node), a ``split`` size or ``slice`` bound along a
   grown dim. No constant is changed because it merely looks like a per-rank count.
3. The graph is then run on fake tensors with the full parameters and the fixed sizes, and
   every node's shape must equal the predicted one (its old shape, grown dims times growth).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from adp_pass.fx_vocab import (
    RESHAPE_OPS,
    SLICE_OPS,
    SPLIT_OPS,
    NoMetadataKey,
    dim_arg,
    metadata_key,
)
from adp_pass.plan import ShapeFix, ShardedWeight, Site
from adp_pass.layouts import INT_MAX, Layout, expected_shape
from adp_pass.sharding import ShapeFixError, ShardingAnalysis

aten = torch.ops.aten

__all__ = ["ShapeFixError", "plan_shape_fixes", "propagate_shapes", "fixed_args"]


def fixed_args(
    node: fx.Node, args: list, layouts: dict[str, Any], growth: int
) -> tuple[list, list[ShapeFix]]:
    """``node``'s argument values with the per-rank sizes of grown dims scaled, and the fixes.

    ``args`` are values (fake or real tensors, ints, SymInts) in the order of ``node.args``.
    """
    target, fixes = node.target, []
    layout = layouts.get(node.name)

    def fix(arg: int, index: int | None, old: Any, new_value: Any, multiply: bool = False):
        new = growth if multiply else int(old) * growth
        fixes.append(ShapeFix(node.name, _target_name(node), arg, index,
                              1 if multiply else int(old), new, multiply))
        return new_value

    if target in RESHAPE_OPS or target is aten.expand.default:
        sizes = list(args[1])
        for dim, _ in layout.dims:
            entry = node.args[1][dim]
            if isinstance(entry, int) and entry == -1:
                continue
            if isinstance(entry, int):
                sizes[dim] = fix(1, dim, entry, entry * growth)
            else:  # a symbolic size (a graph node): multiply it
                sizes[dim] = fix(1, dim, 1, sizes[dim] * growth, multiply=True)
        args[1] = sizes
    elif target in SPLIT_OPS or target in SLICE_OPS:
        source = node.args[0]
        rank = len(source.meta["val"].shape)
        dim = dim_arg(node, 2 if target in SPLIT_OPS else 1)
        if layouts[source.name].at(dim % rank) is None:
            return args, fixes
        if target in SPLIT_OPS and isinstance(args[1], (list, tuple)):
            args[1] = [fix(1, j, s, int(s) * growth) for j, s in enumerate(args[1])]
        elif target in SPLIT_OPS:
            args[1] = fix(1, None, args[1], int(args[1]) * growth)
        else:  # slice(x, dim, start, end) / narrow(x, dim, start, length)
            for index in (2, 3):
                value = args[index] if index < len(args) else None
                if isinstance(value, int) and 0 < value < INT_MAX:
                    args[index] = fix(index, None, value, value * growth)
    return args, fixes


class _Walk:
    """Runs the live nodes on fake tensors as the rewrite will leave them."""

    def __init__(self, analysis: ShardingAnalysis, layouts: dict[str, Any],
                 attr_shapes: dict[str, tuple], growth: int) -> None:
        self.analysis, self.layouts = analysis, layouts
        self.attr_shapes, self.growth = attr_shapes, growth
        self.fixes: list[ShapeFix] = []
        self.copies: list[str] = []
        self.env: dict[str, Any] = {}
        self.calls = FakeCalls()

    def run(self) -> dict[str, Any]:
        order = self.analysis.live_nodes()
        values = [n.meta.get("val") for n in order]
        fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
        if fake_mode is None:
            raise ShapeFixError("graph nodes carry no fake-tensor metadata (meta['val'])")
        with fake_mode:
            for node in order:
                self.env[node.name] = self.evaluate(node)
                self.check(node)
        return self.env

    def evaluate(self, node: fx.Node) -> Any:
        if node.name in self.analysis.redirect:
            return self.env[self.analysis.redirect[node.name]]
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
        raw_args, kwargs = self.analysis.inputs(node)
        args = list(fx.node.map_arg(raw_args, lambda n: self.env[n.name]))
        kwargs = fx.node.map_arg(kwargs, lambda n: self.env[n.name])
        args, fixes = fixed_args(node, args, self.layouts, self.growth)
        self.fixes += fixes
        try:
            return self.calls(node.target, args, kwargs)
        except Exception as err:
            if node.target is aten.view.default:
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
                f"node {node.name} ({node.target}) fails on the full-size inputs: {err}"
            ) from err

    def check(self, node: fx.Node) -> None:
        """The value must have the shape the layout predicts."""
        layout = self.layouts.get(node.name)
        old, new = node.meta.get("val"), self.env[node.name]
        pairs = zip(old, new, layout) if isinstance(layout, tuple) else [(old, new, layout)]
        for old_value, new_value, piece in pairs:
            if not isinstance(piece, Layout) or not isinstance(new_value, torch.Tensor):
                continue
            want = expected_shape(old_value, new_value, piece, self.growth)
            if want is not None:
                raise ShapeFixError(
                    f"node {node.name} ({node.target}) has shape {list(new_value.shape)} at "
                    f"full size, but its layout ({piece.describe()}) says {want}"
                )


def plan_shape_fixes(
    gm: fx.GraphModule,
    sites: list[Site],
    weights: dict[str, ShardedWeight],
    attr_shapes: dict[str, tuple],
    growth: int,
) -> tuple[list[ShapeFix], list[str], dict[str, Any], dict[str, Any]]:
    """The constants to change so ``gm`` runs with full ``weights`` once ``sites`` are
    removed, the ``view`` nodes that must become ``reshape`` (copy), the live nodes' fake
    values after that, and every live node's layout."""
    analysis = ShardingAnalysis(gm, sites, weights, growth)
    layouts = analysis.run()
    walk = _Walk(analysis, layouts, attr_shapes, growth)
    values = walk.run()
    return walk.fixes, walk.copies, values, layouts


def propagate_shapes(gm: fx.GraphModule) -> dict[str, Any]:
    """Every node's fake value for the module's current attributes; raises on a mismatch."""
    shapes = {name: tuple(t.shape) for name, t in (*gm.named_parameters(), *gm.named_buffers())}
    values = [n.meta.get("val") for n in gm.graph.nodes]
    fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    if fake_mode is None:
        raise ShapeFixError("graph nodes carry no fake-tensor metadata (meta['val'])")
    env: dict[str, Any] = {}
    calls = FakeCalls()
    with fake_mode:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = node.meta["val"]
            elif node.op == "get_attr":
                old = node.meta["val"]
                env[node.name] = torch.empty(shapes.get(node.target, old.shape),
                                             dtype=old.dtype, device=old.device)
            elif node.op == "call_function":
                args = fx.node.map_arg(node.args, lambda n: env[n.name])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
                try:
                    env[node.name] = calls(node.target, args, kwargs)
                except Exception as err:
                    raise ShapeFixError(
                        f"node {node.name} ({node.target}) fails on the module's parameters: "
                        f"{err}"
                    ) from err
    return env


class FakeCalls:
    """Runs ops on fake tensors, once per distinct call.

    A call is known by its op and its arguments' metadata (dtype, device, sizes and strides as
    sympy expressions, constants). The decoder layers of a model repeat the same calls, and
    each one costs milliseconds of symbolic-shape work; only the output's metadata matters to
    the walks here, so a repeated call gets the first one's output.
    """

    def __init__(self) -> None:
        self.results: dict[tuple, Any] = {}

    def __call__(self, target: Any, args: Any, kwargs: dict) -> Any:
        try:
            key = (target, metadata_key(args), metadata_key(kwargs))
            hash(key)
        except NoMetadataKey:
            return target(*args, **kwargs)
        if key not in self.results:
            self.results[key] = target(*args, **kwargs)
        return self.results[key]


def _target_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target).replace("aten.", "")
