"""Rewrite: execute a plan on the graph.

Steps, each counted in the report: remove the sites' collectives, fix the shape constants,
swap every sharded parameter for a full one (registered under every name it has in the
unsharded model, so the original state dict loads with ``strict=True``), drop dead code.
"""

from __future__ import annotations

import operator
import time
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx

from adp_pass.detect import find_collectives
from adp_pass.patterns.structure import COLLECTIVE_OPS, WAIT_OPS, is_op
from adp_pass.plan import Plan
from adp_pass.shapes import propagate_shapes


class RewriteError(RuntimeError):
    """The plan does not fit the graph it is applied to."""


@dataclass
class RewriteReport:
    sites_removed: int
    shape_constants_fixed: int
    params_replaced: int
    nodes_removed: int
    collectives_left: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def rewrite(
    gm: fx.GraphModule,
    plan: Plan,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> fx.GraphModule:
    """Turn ``gm`` (as ``detect`` saw it) into its attention-DP form, in place.

    Full parameters come from ``state_dict`` (the unsharded model's) when given; otherwise they
    are uninitialised tensors of the full shape on the local shard's device (use
    ``load_state_dict`` afterwards). The report is ``gm.meta["adp_report"]``.
    """
    start = time.perf_counter()
    graph = gm.graph
    nodes_before = len(graph.nodes)
    names = {n.name for n in graph.nodes}
    missing = [
        name
        for site in plan.sites
        for name in (site.collective, site.replaced, site.replacement)
        if name not in names
    ] + [n for n in [f.node for f in plan.shape_fixes] + plan.views_to_copy if n not in names]
    if missing:
        raise RewriteError(
            f"the plan names nodes the graph does not have ({missing[:5]}...): it was made for "
            "another graph; run detect on this one"
        )

    for site in plan.sites:
        site.remove(graph)
    nodes = {n.name: n for n in graph.nodes}
    for fix in plan.shape_fixes:
        fix.apply(graph, nodes)
    for name in plan.views_to_copy:
        nodes[name].target = torch.ops.aten.reshape.default
    replaced = _swap_parameters(gm, plan, state_dict)
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    graph.lint()
    gm.recompile()
    _drop_unused_attributes(gm)

    if plan.node_values:  # detect already propagated the full shapes
        for node in graph.nodes:
            if node.name in plan.node_values:
                node.meta["val"] = plan.node_values[node.name]
            elif node.target is operator.mul and node.op == "call_function":  # a size fix
                node.meta["val"] = operator.mul(*fx.node.map_arg(node.args, _meta_val))
    else:  # a plan read back from JSON: walk the graph once more
        env = propagate_shapes(gm)
        for node in graph.nodes:
            if node.op != "output":
                node.meta["val"] = env[node.name]
    left = len(find_collectives(graph))
    gm.meta["adp_report"] = RewriteReport(
        sites_removed=len(plan.sites),
        shape_constants_fixed=len(plan.shape_fixes),
        params_replaced=replaced,
        nodes_removed=nodes_before - len(graph.nodes),
        collectives_left=left,
        seconds=time.perf_counter() - start,
    )
    return gm


def _swap_parameters(
    gm: fx.GraphModule, plan: Plan, state_dict: dict[str, torch.Tensor] | None
) -> int:
    count = 0
    for spec in plan.params:
        local = gm.get_parameter(spec.name) if _is_param(gm, spec.name) else gm.get_buffer(spec.name)
        if spec.layout == "replicated" and state_dict is None:
            continue
        if state_dict is not None and spec.name in state_dict:
            full = state_dict[spec.name]
            if tuple(full.shape) != spec.full_shape:
                raise RewriteError(
                    f"state dict tensor {spec.name} has shape {list(full.shape)}, expected "
                    f"{list(spec.full_shape)} (the unsharded model's)"
                )
            full = full.to(device=local.device, dtype=local.dtype)
        elif spec.layout == "replicated":
            continue
        else:
            full = torch.empty(spec.full_shape, dtype=local.dtype, device=local.device)
        new = torch.nn.Parameter(full, requires_grad=False) if isinstance(
            local, torch.nn.Parameter
        ) else full
        for alias in spec.aliases:
            owner, leaf = owner_of(gm, alias)
            if isinstance(new, torch.nn.Parameter):
                owner.register_parameter(leaf, new)
            else:
                owner.register_buffer(leaf, new, persistent=leaf not in owner._non_persistent_buffers_set)
        count += spec.layout != "replicated"
    return count


def _is_param(gm: fx.GraphModule, name: str) -> bool:
    owner, leaf = owner_of(gm, name)
    return leaf in owner._parameters


def owner_of(gm: torch.nn.Module, dotted: str) -> tuple[torch.nn.Module, str]:
    """The submodule holding attribute ``dotted`` and the attribute's own name."""
    path, _, leaf = dotted.rpartition(".")
    return (gm.get_submodule(path) if path else gm), leaf


def _meta_val(node: fx.Node):
    return node.meta["val"]


def _is_impure(node: fx.Node) -> bool:
    # DCE keeps wait_tensor (it looks side-effecting); a wait whose result nobody reads, and the
    # collective it waits on, are exactly what the rewrite leaves behind to be dropped.
    if is_op(node, WAIT_OPS) or is_op(node, COLLECTIVE_OPS):
        return False
    return node.is_impure()


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Attributes no node reads any more (only collective helpers, in practice) are removed,
    except parameters and persistent buffers, which belong to the model's state dict."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        owner, leaf = owner_of(gm, name)
        if name not in used and leaf in owner._non_persistent_buffers_set:
            delattr(owner, leaf)
