"""Rewrite: execute a plan, returning a new module; the caller's graph is never touched.

Order: check that the plan belongs to this graph (its fingerprint) and that the state dict
fits, run the numeric self-check on the original graph (when weights are given), then copy the
graph and, on the copy: remove the sites' collectives, fix the shape constants, swap every
sharded parameter for a full one (registered under every name it has in the unsharded model,
so the original state dict loads with ``strict=True``), drop dead code. Last, the finished
module's shapes are propagated once more and its outputs must keep their shapes.
"""

from __future__ import annotations

import operator
import time

import torch
import torch.fx as fx

from adp_pass.attributes import owner_of, set_attr
from adp_pass.errors import RewriteError
from adp_pass.fx_vocab import (COLLECTIVE_OPS, copy_graph, is_impure_except_collectives,
                               is_op, nodes_between)
from adp_pass.graph_record import RewriteReport, copy_graph_record, graph_record
from adp_pass.plan import GROUP_TAG, Plan, graph_fingerprint
from adp_pass.self_check import check_numerics
from adp_pass.shapes import propagate_shapes


def rewrite(
    gm: fx.GraphModule,
    plan: Plan,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    self_check: bool = True,
) -> fx.GraphModule:
    """A new module: ``gm`` (as ``detect`` saw it) in attention-DP form. ``gm`` is unchanged.

    Full parameters come from ``state_dict`` (the unsharded model's) when given; otherwise they
    are uninitialised tensors of the full shape on the local shard's device (use
    ``load_state_dict`` afterwards). With ``self_check`` (the default), a given state dict also
    drives a numeric check of the first layer (see :mod:`adp_pass.self_check`), and the result's
    output shapes are checked. The report is ``graph_record(result).rewrite``
    (:func:`rewrite_and_report` also returns it).
    """
    return rewrite_and_report(gm, plan, state_dict, self_check=self_check)[0]


def rewrite_and_report(
    gm: fx.GraphModule,
    plan: Plan,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    self_check: bool = True,
) -> tuple[fx.GraphModule, RewriteReport]:
    """:func:`rewrite`, and its report (also kept in the result's record)."""
    start = time.perf_counter()
    _check_plan_fits(gm, plan)
    if state_dict is not None:
        _check_state_dict(plan, state_dict)
    check_text = "skipped (--no-self-check)" if not self_check else "shapes"
    if self_check and state_dict is not None:
        if plan.replicated_only:
            check_text = check_numerics(gm, plan, state_dict).summary()
        else:
            check_text = ("shapes (the numeric self-check covers the replicated mapping; "
                          "parity on ranks checks this one)")

    new = _copy_module(gm)
    graph = new.graph
    nodes_before = len(graph.nodes)
    nodes = {n.name: n for n in graph.nodes}
    for site in plan.sites:
        if site.action == "remove":
            site.remove(graph)
        elif site.action == "keep":
            nodes[site.collective].meta[GROUP_TAG] = site.group_tag
        elif site.action == "gather_scatter":
            _gather_scatter(graph, site)
        else:
            raise RewriteError(f"site {site.collective}: unknown action {site.action!r}")
    nodes = {n.name: n for n in graph.nodes}
    for fix in plan.shape_fixes:
        fix.apply(graph, nodes)
    for name in plan.views_to_copy:
        nodes[name].target = torch.ops.aten.reshape.default
    replaced = _swap_parameters(new, plan, state_dict)
    graph.eliminate_dead_code(is_impure_node=is_impure_except_collectives)
    graph.lint()
    new.recompile()
    _drop_unused_attributes(new)

    if plan.node_values and not self_check:  # detect already propagated the full shapes
        for node in graph.nodes:
            if node.name in plan.node_values:
                node.meta["val"] = plan.node_values[node.name]
            elif node.target is operator.mul and node.op == "call_function":  # a size fix
                node.meta["val"] = operator.mul(*fx.node.map_arg(node.args, _meta_val))
    else:  # walk the finished graph once more, independently of detect's walk
        env = propagate_shapes(new)
        for node in graph.nodes:
            if node.op != "output":
                node.meta["val"] = env[node.name]
        if self_check:
            _check_outputs(gm, new)
    left = sum(is_op(n, COLLECTIVE_OPS) for n in graph.nodes)
    report = RewriteReport(
        sites_removed=len(plan.sites),
        shape_constants_fixed=len(plan.shape_fixes),
        params_replaced=replaced,
        nodes_removed=nodes_before - len(graph.nodes),
        collectives_left=left,
        seconds=time.perf_counter() - start,
        self_check=check_text,
    )
    # Kept with the graph: detect and rewrite refuse a graph that is already rewritten.
    graph_record(new).rewrite = report
    return new, report


_FUNCOL = torch.ops._c10d_functional


def _gather_scatter(graph: fx.Graph, site) -> None:
    """All-gather the block's input over the site's group along dim 0 (every rank of the group
    steps with the same batch: the runtime pads), run the block on every rank's tokens with its
    weights sharded over the group, and reduce-scatter the partial output back to this rank's
    own rows, in place of the all-reduce."""
    nodes = {n.name: n for n in graph.nodes}
    start, collective = nodes[site.block_input], nodes[site.collective]
    partial = collective.args[0]
    done = nodes[site.wait] if site.wait is not None else collective
    region = nodes_between(start, partial)
    group_name = str(collective.args[-1])
    with graph.inserting_after(start):
        gathered = graph.call_function(_FUNCOL.all_gather_into_tensor.default,
                                       (start, site.group_size, group_name))
    with graph.inserting_after(gathered):
        gathered_wait = graph.call_function(_FUNCOL.wait_tensor.default, (gathered,))
    for user in list(start.users):
        if user in region:
            user.replace_input_with(start, gathered_wait)
    with graph.inserting_after(partial):
        scattered = graph.call_function(_FUNCOL.reduce_scatter_tensor.default,
                                        (partial, "sum", site.group_size, group_name))
    with graph.inserting_after(scattered):
        scattered_wait = graph.call_function(_FUNCOL.wait_tensor.default, (scattered,))
    gathered.meta[GROUP_TAG] = scattered.meta[GROUP_TAG] = site.group_tag
    done.replace_all_uses_with(scattered_wait)
    for node in (done, collective):
        if not node.users and node.graph is graph:
            graph.erase_node(node)


def _check_plan_fits(gm: fx.GraphModule, plan: Plan) -> None:
    if graph_record(gm).rewritten:
        raise RewriteError(
            "this graph is already rewritten (attention-DP form); rewrite the captured TP "
            "graph, not the result of rewrite()"
        )
    if plan.fingerprint and plan.fingerprint != graph_fingerprint(gm):
        raise RewriteError(
            "the plan was made for another graph (its fingerprint does not match this one); "
            "run detect() on this graph and rewrite with that plan"
        )
    names = {n.name for n in gm.graph.nodes}
    missing = [
        name
        for site in plan.sites
        for name in (site.collective, site.replaced, site.replacement)
        if name not in names
    ] + [n for n in [f.node for f in plan.shape_fixes] + plan.views_to_copy if n not in names]
    attrs = {name for name, _ in (*gm.named_parameters(), *gm.named_buffers())}
    missing += [p.name for p in plan.params if p.name not in attrs]
    if missing:
        raise RewriteError(
            f"the plan names nodes or parameters the graph does not have ({missing[:5]}): it "
            "was made for another graph; run detect() on this one"
        )


def _check_state_dict(plan: Plan, state_dict: dict[str, torch.Tensor]) -> None:
    for spec in plan.params:
        full = state_dict.get(spec.name)
        if full is None or tuple(full.shape) == spec.full_shape:
            continue
        hint = ""
        if spec.dim is not None and full.dim() == len(spec.full_shape) and \
                full.shape[spec.dim] < spec.full_shape[spec.dim]:
            hint = (f"; the unsharded tensor is smaller than {plan.mapping.tp_size} local shards, so "
                    "the TP source replicates parts of it over ranks (e.g. kv heads when tp > "
                    "num_key_value_heads), which attention-DP cannot regroup: use a tp that "
                    "divides the kv heads")
        raise RewriteError(
            f"state dict tensor {spec.name} has shape {list(full.shape)}, expected "
            f"{list(spec.full_shape)} (tp x its local shard {list(spec.local_shape)}){hint}"
        )


def _check_outputs(before: fx.GraphModule, after: fx.GraphModule) -> None:
    """The rewritten module returns what the TP graph returned: same shapes."""
    def shapes(gm: fx.GraphModule) -> list:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        values = []
        fx.node.map_arg(output.args, lambda n: values.append(n.meta.get("val")))
        return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values]

    want, have = shapes(before), shapes(after)
    if [tuple(map(str, s or ())) for s in want] != [tuple(map(str, s or ())) for s in have]:
        raise RewriteError(
            f"self-check: the rewritten graph returns shapes {have}, the TP graph {want}"
        )


def _copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its tensors (same names)."""
    new = fx.GraphModule(gm, copy_graph(gm.graph))
    for name, tensor in (*gm.named_parameters(remove_duplicate=False),
                         *gm.named_buffers(remove_duplicate=False)):
        owner, leaf = owner_of(gm, name)
        persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", ())
        set_attr(new, name, tensor, persistent)
    new.meta = dict(gm.meta)
    copy_graph_record(gm, new)  # the rewrite's marks go on the copy only
    return new


def _swap_parameters(
    gm: fx.GraphModule, plan: Plan, state_dict: dict[str, torch.Tensor] | None
) -> int:
    count = 0
    for spec in plan.params:
        local = gm.get_parameter(spec.name) if _is_param(gm, spec.name) else gm.get_buffer(spec.name)
        if state_dict is not None and spec.name in state_dict:
            full = spec.held_part(state_dict[spec.name], plan.rank).to(
                device=local.device, dtype=local.dtype)
        elif spec.layout == "replicated" or spec.held_shape == tuple(local.shape):
            continue
        else:
            full = torch.empty(spec.held_shape, dtype=local.dtype, device=local.device)
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


def _meta_val(node: fx.Node):
    return node.meta["val"]


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Attributes no node reads any more (only collective helpers, in practice) are removed,
    except parameters and persistent buffers, which belong to the model's state dict."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        owner, leaf = owner_of(gm, name)
        if name not in used and leaf in owner._non_persistent_buffers_set:
            delattr(owner, leaf)
