"""Detect: classify every collective of a TP graph and plan the attention-DP rewrite.

``detect(gm, mapping)`` reads the graph and returns a :class:`~adp_pass.plan.Plan`; it never
mutates the graph. A collective is classified by what feeds it (see ``patterns/``); one that
no pattern explains is listed in the plan and is an error in strict mode, because removing the
others would leave a graph that still waits on its peers.
"""

from __future__ import annotations

import dataclasses

import sympy

import torch
import torch.fx as fx

from adp_pass import fp8
from adp_pass.errors import AdpError
from adp_pass.fx_vocab import (ALL_GATHER_OPS, COLLECTIVE_OPS, FP8_LINEAR_OPS, attr_source,
                               descendants, is_op, nodes_between)
from adp_pass.graph_record import graph_record
from adp_pass.mapping import ROLE_OF_KIND, Mapping, MappingError, role_parts, site_action
from adp_pass.patterns import SITE_PATTERNS
from adp_pass.patterns.structure import annotate_positions
from adp_pass.plan import ParamSpec, Plan, ShapeFix, ShardedWeight, Site, graph_fingerprint
from adp_pass.shapes import ShapeFixError, plan_shape_fixes


class DetectError(AdpError, ValueError):
    """The graph is not one the rewrite can turn into attention-DP form."""

    default_hint = "--no-strict lists the collectives no pattern explains; --debug shows where"


def find_collectives(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_op(n, COLLECTIVE_OPS)]


def classify(collective: fx.Node) -> Site | None:
    for pattern in SITE_PATTERNS:
        site = pattern.match(collective)
        if site is not None:
            return site
    return None


def graph_world_size(gm: fx.GraphModule, collectives: list[fx.Node]) -> int | None:
    """The TP degree the graph was traced with: from an all-gather's group size, else from
    the capture's record."""
    for node in collectives:
        if is_op(node, ALL_GATHER_OPS):
            return int(node.args[1])
    return graph_record(gm).world_size


def detect(gm: fx.GraphModule, mapping: Mapping | str, *, strict: bool = True) -> Plan:
    """Plan the attention-DP rewrite of ``gm`` under ``mapping``."""
    mapping = Mapping.load(mapping)
    if graph_record(gm).rewritten:
        raise DetectError(
            "this graph is already rewritten (attention-DP form); detect the captured TP graph"
        )
    annotate_positions(gm.graph)
    collectives = find_collectives(gm.graph)
    traced_tp = graph_world_size(gm, collectives)
    if traced_tp is not None and traced_tp != mapping.tp_size:
        raise MappingError(
            f"the graph was traced with {traced_tp} TP ranks but the mapping says "
            f"tp={mapping.tp_size}; pass tp={traced_tp} (the mapping describes the traced job)"
        )

    sites: list[Site] = []
    unclassified: list[str] = []
    for node in collectives:
        site = classify(node)
        if site is None:
            feeder = node.args[0].name if node.args and isinstance(node.args[0], fx.Node) else "?"
            unclassified.append(f"{node.name} ({node.target}) fed by {feeder}")
        else:
            sites.append(site)
    layer_sites = [s for s in sites if s.kind in ("attention_out", "mlp_out")]
    # A one-rank graph (TP on one rank emits no collective) is already attention-DP.
    if not collectives and mapping.tp_size > 1:
        raise DetectError(
            f"the graph has no collectives but the mapping says tp={mapping.tp_size}: it was "
            "traced without tensor parallelism; trace rank r of the TP job (capture_hf_qwen3)"
        )
    if collectives and not layer_sites:
        raise DetectError(
            f"no attention or MLP all-reduce site found among {len(collectives)} collectives "
            f"({'; '.join(unclassified) or 'none'}): this is not a TP Qwen3 decoder graph. Each "
            "layer must end its attention in a row-parallel linear + all-reduce after an "
            "attention core, and its MLP in one after silu(gate) * up"
        )
    counts = {k: sum(s.kind == k for s in sites) for k in ("attention_out", "mlp_out")}
    if counts["attention_out"] != counts["mlp_out"]:
        raise DetectError(
            f"found {counts['attention_out']} attention sites but {counts['mlp_out']} MLP sites; "
            "a Qwen3 decoder layer has one of each"
        )
    if unclassified and strict:
        raise DetectError(
            "collectives no pattern explains (removing the others would leave ranks waiting on "
            "these): " + "; ".join(unclassified) + ". Pass strict=False to list them only"
        )

    sites = [_with_action(site, mapping) for site in sites]
    sites = _with_scales(gm, sites, mapping)  # before any weight is read: whole 128-blocks
    claims = _weight_claims(sites)
    roles = {w.attr: ROLE_OF_KIND[s.kind] for s in sites for w in s.weights}
    params = _param_specs(gm, claims, mapping, roles)
    shape_fixes, views_to_copy, node_values, layouts = _plan_growth(gm, sites, claims, params,
                                                                    mapping)
    plan = Plan(
        mapping=mapping,
        rank=graph_record(gm).rank or 0,
        sites=sites,
        params=params,
        shape_fixes=shape_fixes,
        views_to_copy=views_to_copy,
        unclassified=unclassified,
        node_values=node_values,
        node_layouts=layouts,
        fingerprint=graph_fingerprint(gm),
    )
    return plan


def _with_action(site: Site, mapping: Mapping) -> Site:
    action, tag, size = site_action(site.kind, mapping)
    if action == "gather_scatter" and site.block_input is None:
        raise DetectError(
            f"{site.kind} site {site.collective}: its column linears read different tensors, so "
            f"there is no one input to all-gather for mlp_tp={size}; use mlp_tp=1 or "
            f"mlp_tp={mapping.attn_tp_size}"
        )
    return dataclasses.replace(site, action=action, group_tag=tag, group_size=size)


def _fp8_scales(gm: fx.GraphModule) -> dict[str, str]:
    """``{fp8 weight attribute: its weight_scale_inv attribute}``, read off the FP8 linears."""
    scales: dict[str, str] = {}
    for node in gm.graph.nodes:
        if is_op(node, FP8_LINEAR_OPS):
            weight, scale = attr_source(node.args[1]), attr_source(node.args[2])
            if weight is None or scale is None:
                continue  # not a module's linear: no site claims it
            if scales.setdefault(weight.target, scale.target) != scale.target:
                raise DetectError(f"{weight.target} is used with two scale tensors "
                                  f"({scales[weight.target]}, {scale.target})")
    return scales


def _with_scales(gm: fx.GraphModule, sites: list[Site], mapping: Mapping) -> list[Site]:
    """Each site's FP8 weights with their scales beside them: the scale is sharded on the same
    dim as its weight, its segments the weight's in 128-tiles, so it is gathered, replicated or
    regrouped with the weight under every mapping. A traced shard that is not whole tiles is
    refused here, before any weight is read (:class:`~adp_pass.fp8.Fp8BlockError`)."""
    scales = _fp8_scales(gm)
    if not scales:
        return sites
    block = fp8.WEIGHT_BLOCK[0]
    misfits, sizes = [], []
    full_sizes: dict[str, list[int]] = {}  # role -> every FP8 segment's full size
    out = []
    for site in sites:
        extra = []
        for weight in site.weights:
            scale = scales.get(weight.attr)
            if scale is None:
                continue
            local = tuple(int(n) for n in gm.get_parameter(weight.attr).shape)
            segments = weight.segments or (local[weight.dim],)
            sizes += [n * mapping.tp_size for n in segments]
            full_sizes.setdefault(ROLE_OF_KIND[site.kind], []).extend(
                n * mapping.tp_size for n in segments)
            if any(n % block for n in segments):
                misfits.append((weight.attr, weight.dim, local, segments))
                continue
            extra.append(ShardedWeight(scale, weight.layout, weight.dim,
                                       tuple(n // block for n in segments)))
        out.append(dataclasses.replace(site, weights=site.weights + tuple(extra)))
    if misfits:
        name, dim, local, segments = misfits[0]
        what = "rows" if dim == 0 else "columns"
        works = fp8.block_aligned_tp(sizes, max(mapping.tp_size, 8))
        raise fp8.Fp8BlockError(
            f"{name} is FP8 with {block}x{block} scale blocks, but each of the {mapping.tp_size} "
            f"TP ranks holds {' + '.join(map(str, segments))} of its {what} (shape "
            f"{list(local)}), not a multiple of {block}: the rank's scale tiles would cover "
            f"other ranks' values, so mapping {mapping} (and every mapping of this TP job) "
            f"cannot rewrite it ({len(misfits)} FP8 weights so). TP degrees whose shards are "
            f"whole blocks: {', '.join(map(str, works)) or 'none'}; capture at one of them (every "
            "mapping of that job then keeps whole blocks), or capture the bf16 model: the loader "
            "dequantizes the FP8 checkpoint into it under the mappings of this job whose parts "
            f"are whole blocks: {_whole_block_mappings(mapping.tp_size, full_sizes) or 'none'}")
    return out


def _whole_block_mappings(tp: int, full_sizes: dict[str, list[int]]) -> str:
    """The mappings of a ``tp``-rank job that split every FP8 segment of each role into whole
    128-blocks (what a rank of the bf16 graph reads and dequantizes)."""
    block = fp8.WEIGHT_BLOCK[0]
    divisors = [d for d in range(1, tp + 1) if tp % d == 0]

    def whole(role: str, parts: int) -> bool:
        return all(n % parts == 0 and (n // parts) % block == 0 for n in full_sizes.get(role, ()))

    found = [Mapping(tp_size=tp)] if whole("attention", tp) and whole("mlp", tp) else []
    for attn in divisors:
        for mlp in divisors:
            if whole("attention", attn) and whole("mlp", mlp):
                try:
                    found.append(Mapping(tp_size=tp, enable_attention_dp=True,
                                         attn_tp_size=attn, mlp_tp_size=mlp))
                except MappingError:
                    continue
    return "; ".join(map(str, found))


def _plan_growth(gm: fx.GraphModule, sites: list[Site], claims: dict[str, ShardedWeight],
                 params: list[ParamSpec], mapping: Mapping) -> tuple[list, list, dict, dict]:
    """Shape fixes for every weight regrouping, then for every token all-gather.

    The weights of roles that grow by the same factor (tp / parts) are followed by one sharding
    analysis; roles of different factors never meet in a node (a site separates them), so
    each analysis treats the others' weights as the traced shards they stay in its walk."""
    parts, tp = role_parts(mapping), mapping.tp_size
    role_of = {w.attr: ROLE_OF_KIND[s.kind] for s in sites for w in s.weights}
    by_growth: dict[int, set[str]] = {}
    for role, count in parts.items():
        if tp // count > 1:
            by_growth.setdefault(tp // count, set()).add(role)
    fixes, copies, values, layouts = [], [], {}, {}
    for growth, roles in sorted(by_growth.items()):
        removed = [s for s in sites if s.action == "remove" and ROLE_OF_KIND[s.kind] in roles]
        weights = {a: w for a, w in claims.items() if role_of[a] in roles}
        if not weights:
            continue
        shapes = {p.name: p.held_shape for p in params if p.role in roles}
        class_fixes, class_copies, values, layouts = plan_shape_fixes(
            gm, removed, weights, shapes, growth=growth)
        fixes += class_fixes
        copies += [c for c in class_copies if c not in copies]
    for site in sites:
        if site.action == "gather_scatter":
            fixes += token_gather_fixes(gm, site)
    seen: dict[tuple, ShapeFix] = {}
    for fix in fixes:
        key = (fix.node, fix.arg, fix.index)
        if key in seen and seen[key] != fix:
            raise ShapeFixError(
                f"node {fix.node} arg {fix.arg}: one size must change for two reasons (a weight "
                "regrouping and a token gather); this mapping cannot be proven for this graph: "
                "use mlp_tp=1"
            )
        seen[key] = fix
    simple = len(by_growth) == 1 and all(s.action == "remove" for s in sites)
    # Fake values and layouts stand for the graph after the rewrite only when one analysis saw
    # every change (the replicated mapping); otherwise rewrite propagates shapes itself.
    return list(seen.values()), copies, values if simple else {}, layouts if simple else {}


def token_gather_fixes(gm: fx.GraphModule, site: Site) -> list[ShapeFix]:
    """Sizes to multiply by the group size once ``site.block_input`` is all-gathered along the
    batch dim: every symbolic size, read by a node between the gather and the reduce-scatter,
    that was computed outside that region and scales with the batch."""
    nodes = {n.name: n for n in gm.graph.nodes}
    start, collective = nodes[site.block_input], nodes[site.collective]
    value = start.meta.get("val")
    batch = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None
    if not isinstance(batch, torch.SymInt) or not isinstance(batch.node.expr, sympy.Symbol):
        raise DetectError(
            f"{site.kind} site {site.collective}: the MLP input {start.name} has no symbolic "
            f"batch dim ({list(value.shape) if value is not None else '?'}), so its all-gather "
            "cannot be sized; capture with dynamic shapes (the default)"
        )
    symbol, size = batch.node.expr, site.group_size
    below = descendants(start)
    region = nodes_between(start, collective.args[0])
    fixes = []
    for node in region:
        for arg_index, arg in enumerate(node.args):
            entries = list(enumerate(arg)) if isinstance(arg, (list, tuple)) else [(None, arg)]
            for index, entry in entries:
                if not isinstance(entry, fx.Node) or entry in below:
                    continue
                sym = entry.meta.get("val")
                if not isinstance(sym, torch.SymInt) or symbol not in sym.node.expr.free_symbols:
                    continue
                expr = sym.node.expr
                if sympy.simplify(expr.subs(symbol, size * symbol) - size * expr) != 0:
                    raise DetectError(
                        f"node {node.name} reads size {expr}, which is not proportional to the "
                        f"batch {symbol}; the token all-gather cannot resize it: use mlp_tp=1"
                    )
                fixes.append(ShapeFix(node.name, _target_text(node), arg_index, index, 1, size,
                                      multiply=True))
    return fixes


def _target_text(node: fx.Node) -> str:
    return str(node.target).replace("aten.", "")


def _weight_claims(sites: list[Site]) -> dict[str, ShardedWeight]:
    """How each sharded weight is split, as the sites that use it say; one way only."""
    claims: dict[str, ShardedWeight] = {}
    for site in sites:
        for weight in site.weights:
            previous = claims.setdefault(weight.attr, weight)
            if _layout_key(previous) != _layout_key(weight):
                raise DetectError(
                    f"{weight.attr} is used as {previous.layout} (dim {previous.dim}) and as "
                    f"{weight.layout} (dim {weight.dim}); a weight can be sharded only one way"
                )
    return claims


def _param_specs(
    gm: fx.GraphModule, claims: dict[str, ShardedWeight], mapping: Mapping,
    roles: dict[str, str] | None = None,
) -> list[ParamSpec]:
    tp_size, parts = mapping.tp_size, role_parts(mapping)
    roles = roles or {}
    aliases = _alias_table(gm)
    specs = []
    for name, tensor in _named_tensors(gm):
        local = tuple(int(s) for s in tensor.shape)
        claim = claims.get(name)
        if claim is None:
            layout, dim, segments, full = "replicated", None, (), local
            role, count = "", 1
        else:
            role = roles.get(name, "")
            count = parts.get(role, 1)
            segments = claim.segments or (local[claim.dim],)
            if sum(segments) != local[claim.dim]:
                raise DetectError(
                    f"{name}: fused segments {list(segments)} do not add up to its local size "
                    f"{local[claim.dim]} along dim {claim.dim}"
                )
            full = tuple(s * tp_size if d == claim.dim else s for d, s in enumerate(local))
            layout, dim = claim.layout, claim.dim
        specs.append(
            ParamSpec(
                name=name,
                aliases=tuple(aliases.get(name, [name])),
                layout=layout,
                dim=dim,
                segments=tuple(segments),
                local_shape=local,
                full_shape=full,
                dtype=str(tensor.dtype).replace("torch.", ""),
                role=role,
                parts=count,
            )
        )
    return specs


def _layout_key(weight: ShardedWeight) -> tuple:
    # One segment is no fusion: a tied embedding (vocab rows) and LM head (output rows) agree.
    return weight.dim, weight.segments if len(weight.segments) > 1 else ()


def _named_tensors(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    return [*gm.named_parameters(), *gm.named_buffers()]


def _alias_table(gm: fx.GraphModule) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    by_id: dict[int, str] = {}
    for name, tensor in [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]:
        primary = by_id.setdefault(id(tensor), name)
        table.setdefault(primary, []).append(name)
    return table
