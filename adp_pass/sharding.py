"""Follow the TP-sharded axis through the graph: which dim of every tensor carries it, and how.

The rewrite gives every sharded parameter its full size; each tensor computed from one then
grows along some dims. Which dims is not guessed from which constant looks divisible: it is
*derived* from the sharded parameters forward, op by op, with the rules of
``sharding_rules.py`` over the layouts of ``layouts.py``.

A ``view`` can place the rank digit in more than one output dim (one local head: ``[b, t, D]``
viewed as ``[b, t, 1, D]`` grows either the 1 or the D; both are valid memory layouts). Such a
choice is a *decision*: the walk takes the most likely option first and, when a later op proves
it inconsistent (a norm over the head dim, attention contracting it), goes back and takes the
next. Whatever cannot be made consistent is refused with :class:`ShapeFixError` naming the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from adp_pass.errors import AdpError
from adp_pass.layouts import (
    REPLICATED,
    DimLayout,
    Layout,
    Segment,
    _Conflict,
    _expr,
    _layout,
    _Restart,
    _shape,
    _val,
    grown_shape,
)
from adp_pass.plan import ShardedWeight, Site
from adp_pass.sharding_rules import (
    _broadcast_source,
    _deps_of,
    _nodes_in,
    _op_name,
    _replicated_like,
    _rule_for,
)

_MAX_RETRIES = 500


class ShapeFixError(AdpError, RuntimeError):
    """A node whose sharded axis cannot be followed, so the rewrite cannot prove its sizes."""

    default_hint = ("write per-rank sizes as a plain TP layer does (view(.., -1, head_dim)), or "
                    "report the graph (adp rewrite --out DIR saves it)")


@dataclass
class _Decision:
    signature: tuple
    options: list  # per option: {out dim: DimLayout}


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


