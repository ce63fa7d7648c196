"""Numeric self-check of a plan, node by node, before the rewrite is accepted.

For every node the rewritten graph keeps, within the first decoder layer(s): the op as the TP
graph wrote it, on rank r's local inputs, must give rank r's part of the op as the rewrite
will run it, on the full inputs. Rank r's part of a full value is read off the node's layout
(:func:`adp_pass.sharding.local_part`); a partial sum (a row-parallel linear before its
all-reduce) must add up over all ranks to the full value. This is the inductive step of
"the rewritten graph computes what the TP job computed", checked on real numbers: it catches a
size fixed in the wrong dim even when every shape agrees.

It runs on the original graph (nothing is mutated) with the unsharded weights the caller gave
``rewrite``, on a small random input, on the device the weights are on. Cost: one layer of a
few tokens, once per rank for the partial sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from adp_pass.errors import RewriteError
from adp_pass.fx_vocab import NO_COPY_RESHAPE_OPS
from adp_pass.layouts import Layout, expected_shape, local_part
from adp_pass.plan import Plan
from adp_pass.sharding import ShardingAnalysis

_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
_LOW_PRECISION_TOLERANCE = 3e-2


class SelfCheckError(RewriteError):
    """The rewritten graph would not compute what the TP graph computed."""

    default_hint = "report the graph (adp rewrite --out DIR saves it); --no-self-check skips " \
        "this check at your own risk"


@dataclass
class SelfCheckReport:
    nodes_checked: int
    nodes_skipped: int
    max_error: float
    layers: int

    def summary(self) -> str:
        return (f"numeric: {self.nodes_checked} nodes of {self.layers} layer(s) match rank "
                f"values (max rel. error {self.max_error:.1e})")


def check_numerics(
    gm: fx.GraphModule, plan: Plan, state_dict: dict[str, torch.Tensor], *, layers: int = 1,
    seed: int = 0,
) -> SelfCheckReport:
    """Raise :class:`SelfCheckError` where a node's rewritten form disagrees with its TP form."""
    growth, rank = plan.mapping.tp_size, plan.rank
    layouts = plan.node_layouts
    analysis = ShardingAnalysis(gm, plan.sites, {}, growth)
    order = analysis.live_nodes()
    stop = _window_end(plan, order, layers)
    device = _device(gm)
    if device is None or not layouts:
        return SelfCheckReport(0, 0, 0.0, 0)
    full = _FullValues(gm, plan, state_dict, device, seed)
    symbols = _symbol_values(order)
    local: dict[int, dict[str, Any]] = {q: {} for q in range(growth)}  # partial sums per rank
    live = {n.name for n in order}
    checked = skipped = 0
    worst = 0.0
    for node in order[: stop + 1]:
        full.env[node.name] = full.evaluate(node, analysis)
        _check_shape(node, full.env[node.name], layouts.get(node.name), growth)
        if node.op != "call_function" or node.name in analysis.redirect:
            continue
        inputs = [n for n in node.all_input_nodes]
        if any(n.name not in live or n.name not in layouts for n in inputs) or \
                any((node.name, i) in analysis.rewire for i in range(len(node.args))):
            skipped += 1  # fed by code the rewrite removes (masked vocab lookups)
            continue
        layout = layouts[node.name]
        partial = isinstance(layout, Layout) and layout.partial
        ranks = range(growth) if partial else [rank]
        outputs = {}
        for q in ranks:
            def local_input(n: fx.Node, q: int = q) -> Any:
                value, lay = full.env[n.name], layouts[n.name]
                if isinstance(lay, Layout) and lay.partial:
                    return local[q][n.name]
                if isinstance(lay, tuple):
                    return tuple(local_part(v, l, q, growth, symbols)
                                 if isinstance(l, Layout) else v for v, l in zip(value, lay))
                return local_part(value, lay, q, growth, symbols) \
                    if isinstance(lay, Layout) else value
            args = fx.node.map_arg(node.args, local_input)
            kwargs = fx.node.map_arg(node.kwargs, local_input)
            # Rank parts are strided slices: a view the TP graph could take may need a copy.
            target = _RESHAPE if node.target in NO_COPY_RESHAPE_OPS else node.target
            outputs[q] = target(*args, **kwargs)
        if partial:
            for q in ranks:
                local[q][node.name] = outputs[q]
            want, have = full.env[node.name], sum(outputs[q] for q in ranks)
            worst = max(worst, _compare(node, want, have, "the sum over ranks of", rank))
        else:
            if isinstance(layout, tuple):  # only the outputs the graph reads (not RNG state)
                read = {u.args[1] for u in node.users if u.name in live}
                pairs = [p for i, p in enumerate(zip(full.env[node.name], outputs[rank], layout))
                         if i in read]
            else:
                pairs = [(full.env[node.name], outputs[rank], layout)]
            for value, mine, lay in pairs:
                if isinstance(lay, Layout) and isinstance(value, torch.Tensor):
                    part = local_part(value, lay, rank, growth, symbols)
                    worst = max(worst, _compare(node, part, mine, f"rank {rank}'s", rank))
        checked += 1
    return SelfCheckReport(checked, skipped, worst, layers if stop < len(order) - 1 else 0)


_RESHAPE = torch.ops.aten.reshape.default


def _symbol_values(order: list[fx.Node]) -> dict:
    """The value each symbolic input size takes in the example input (its hint)."""
    values = {}
    for node in order:
        value = node.meta.get("val")
        if node.op == "placeholder" and isinstance(value, torch.Tensor):
            for size in value.shape:
                if isinstance(size, torch.SymInt):
                    values[size.node.expr] = _hint(size)
    return values


def _check_shape(node: fx.Node, value: Any, layout: Any, growth: int) -> None:
    """The full value must have the TP value's shape with the layout's dims grown."""
    old = node.meta.get("val")
    pieces = zip(old, value, layout) if isinstance(layout, tuple) else [(old, value, layout)]
    for old_value, new_value, piece in pieces:
        if not isinstance(piece, Layout) or not isinstance(new_value, torch.Tensor):
            continue
        want = expected_shape(old_value, new_value, piece, growth)
        if want is not None:
            raise SelfCheckError(
                f"self-check: node {node.name} ({node.target}) gives shape "
                f"{list(new_value.shape)} after the rewrite, but rank values of the TP graph "
                f"need {want} ({piece.describe()}). The rewrite would be wrong here; it is "
                "refused (report the graph)")


def _compare(node: fx.Node, want: torch.Tensor, have: torch.Tensor, what: str, rank: int) -> float:
    if not isinstance(want, torch.Tensor) or not want.is_floating_point():
        if isinstance(want, torch.Tensor) and not torch.equal(want, have):
            raise SelfCheckError(f"self-check: node {node.name} ({node.target}): {what} values "
                                 "differ from the rewritten graph's")
        return 0.0
    tolerance = _TOLERANCE.get(want.dtype, _LOW_PRECISION_TOLERANCE)
    want, have = want.double(), have.double()
    finite = torch.isfinite(want) & torch.isfinite(have)
    if not torch.equal(torch.isfinite(want), torch.isfinite(have)) or want.shape != have.shape:
        error = float("inf")
    else:
        scale = max(1.0, want[finite].abs().max().item()) if finite.any() else 1.0
        error = ((want - have)[finite].abs().max().item() / scale) if finite.any() else 0.0
    if error > tolerance:
        raise SelfCheckError(
            f"self-check: node {node.name} ({node.target}): {what} values of the TP graph and "
            f"the rewritten graph differ (relative error {error:.2e} > {tolerance:.0e}). The "
            "rewrite would be wrong here; it is refused (report the graph)"
        )
    return error


def _window_end(plan: Plan, order: list[fx.Node], layers: int) -> int:
    """Position (in ``order``) of the end of the first ``layers`` decoder layers."""
    ends = [s.replaced for s in plan.sites if s.kind == "mlp_out"]
    position = {n.name: i for i, n in enumerate(order)}
    ends = sorted(position[name] for name in ends if name in position)
    return ends[layers - 1] if len(ends) >= layers else len(order) - 1


def _device(gm: fx.GraphModule) -> torch.device | None:
    for tensor in (*gm.parameters(), *gm.buffers()):
        return None if tensor.is_meta else tensor.device
    return torch.device("cpu")


class _FullValues:
    """The rewritten graph's values on a small random input, computed on the original graph
    with the fixes applied on the fly."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, state_dict: dict, device, seed: int):
        self.gm, self.device = gm, device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.env: dict[str, Any] = {}
        self.full: dict[str, torch.Tensor] = {}
        for spec in plan.params:
            tensor = next((state_dict[a] for a in spec.aliases if a in state_dict), None)
            if tensor is not None:
                self.full[spec.name] = tensor
        self.copies = set(plan.views_to_copy)
        self.fixes: dict[str, list] = {}
        for fix in plan.shape_fixes:  # what rewrite will run, not what the layouts suggest
            self.fixes.setdefault(fix.node, []).append(fix)
        self.vocab = min((spec.full_shape[0] for spec in plan.params
                          if spec.layout == "vocab"), default=None)

    def evaluate(self, node: fx.Node, analysis: ShardingAnalysis) -> Any:
        if node.name in analysis.redirect:
            return self.env[analysis.redirect[node.name]]
        if node.op == "placeholder":
            return self.example(node.meta["val"])
        if node.op == "output":
            return None
        if node.op == "get_attr":
            local = _attr(self.gm, node.target)
            tensor = self.full.get(node.target, local)
            return tensor.to(device=self.device, dtype=local.dtype)
        raw_args, kwargs = analysis.inputs(node)
        args = list(fx.node.map_arg(raw_args, lambda n: self.env[n.name]))
        kwargs = fx.node.map_arg(kwargs, lambda n: self.env[n.name])
        for fix in self.fixes.get(node.name, ()):
            args = fix.apply_to_values(args)
        target = torch.ops.aten.reshape.default if node.name in self.copies else node.target
        return target(*args, **kwargs)

    def example(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return _hint(value)
        shape = [_hint(s) for s in value.shape]
        if value.dtype.is_floating_point:
            data = torch.randn(shape, generator=self.generator)
        elif value.dtype == torch.bool:
            data = torch.ones(shape, dtype=torch.bool)
        else:
            data = torch.randint(0, self.vocab or 2, shape, generator=self.generator)
        return data.to(device=self.device, dtype=value.dtype)


def _hint(size: Any) -> int:
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else 2
    return int(size)


def _attr(gm: fx.GraphModule, dotted: str) -> torch.Tensor:
    value: Any = gm
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
