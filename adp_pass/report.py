"""What ``adp rewrite --out`` writes: the plan, a text report, both graphs, and a picture."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
import torch.fx as fx

from adp_pass.fx_vocab import (
    ATTENTION_CORE_OPS,
    COLLECTIVE_OPS,
    MATMUL_OPS,
    SOFTMAX_OPS,
    VIEW_OPS,
    WAIT_OPS,
)
from adp_pass.plan import Plan

aten = torch.ops.aten
_CATEGORIES = (
    ("collectives", COLLECTIVE_OPS | set(WAIT_OPS)),
    ("matmuls", MATMUL_OPS | {aten.bmm.default}),
    ("attention", ATTENTION_CORE_OPS | SOFTMAX_OPS),
    ("views", VIEW_OPS | {aten.expand.default, aten.slice.Tensor, aten.split.Tensor}),
)


def summarize_graph(gm: fx.GraphModule) -> dict:
    """Node counts by category, the collective calls (without their waits), and the parameter
    elements a rank holds."""
    counts: Counter = Counter()
    calls = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        category = next((name for name, ops in _CATEGORIES if node.target in ops), "other")
        counts[category] += 1
        calls += node.target in COLLECTIVE_OPS
    params = sum(p.numel() for p in gm.parameters())
    return {"nodes": len(gm.graph.nodes), "ops": dict(counts), "collective_calls": calls,
            "param_elements": params}


def weight_bytes(plan: Plan) -> tuple[int, int]:
    """Bytes of the parameters one rank holds: (TP shard, after the rewrite), each at the dtype
    it was traced in (``traced_dtypes``: float32 for the presets; bf16 serving holds half)."""
    def size(shape, dtype):
        return math.prod(shape) * getattr(torch, dtype).itemsize

    tp = sum(size(p.local_shape, p.dtype) for p in plan.params)
    return tp, sum(size(p.held_shape, p.dtype) for p in plan.params)


def traced_dtypes(plan: Plan) -> str:
    """The dtypes the plan's parameters were traced in, e.g. "float32" (sizes are counted at
    them)."""
    return "/".join(sorted({p.dtype for p in plan.params})) or "no weights"


def write_rewrite_outputs(
    out: Path,
    plan: Plan,
    before: dict,
    after: dict,
    before_code: str,
    after_code: str,
    timings: dict[str, float],
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "plan.json": plan.to_json(),
        "report.txt": str(plan) + "\n",
        "summary.json": json.dumps({"before": before, "after": after, "timings": timings}, indent=1),
        "graph_before.py": before_code,
        "graph_after.py": after_code,
    }
    paths = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        paths.append(path)
    paths.append(plot_before_after(out / "before_after.png", plan, before, after))
    return paths


def _layer_of(site) -> int | None:
    for weight in site.weights:
        if match := re.search(r"layers\.(\d+)\.", weight.attr):
            return int(match.group(1))
    return None


def plot_before_after(path: Path, plan: Plan, before: dict, after: dict) -> Path:
    """Three panels: collectives per layer before/after, weight bytes a rank holds before/after
    by TP layout, and what the rewrite changed. Every count in a title is computed here from
    the same numbers the panels draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (col_ax, mem_ax, fix_ax) = plt.subplots(1, 3, figsize=(16, 4.6),
                                                 gridspec_kw={"width_ratios": [2.2, 1, 1.3]})
    n_before = before.get("collective_calls", len(plan.sites) + len(plan.unclassified))
    n_after = after.get("collective_calls", 0)

    # Left: collectives per layer, by site kind, before; what is left after (not per layer:
    # a collective no pattern explains has no layer to belong to).
    layers = sorted({_layer_of(s) for s in plan.sites} - {None})
    outside = any(_layer_of(s) is None for s in plan.sites) or n_after > 0
    groups = [str(i) for i in layers] + (["outside layers"] if outside else [])
    kinds = sorted({s.kind for s in plan.sites})
    xs = list(range(len(groups)))
    bottom = [0] * len(groups)
    for kind in kinds:
        per = [sum(1 for s in plan.sites if s.kind == kind and
                   (_layer_of(s) == layer if layer is not None else _layer_of(s) is None))
               for layer in [*layers, None][: len(groups)]]
        col_ax.bar([x - 0.2 for x in xs], per, 0.4, bottom=bottom, label=f"TP: {kind}")
        bottom = [b + p for b, p in zip(bottom, per)]
    left = ([0] * len(layers) + [n_after])[: len(groups)]
    after_bars = col_ax.bar([x + 0.2 for x in xs], left, 0.4, color="black",
                            label=f"attention-DP: left ({n_after})")
    col_ax.bar_label(after_bars, fontsize=7)  # the zeros are the point: show them
    col_ax.yaxis.get_major_locator().set_params(integer=True)
    col_ax.set_xticks(xs, groups, rotation=90 if len(groups) > 16 else 0, fontsize=8)
    col_ax.set_xlabel("decoder layer")
    col_ax.set_ylabel("collectives")
    col_ax.set_ylim(0, max(bottom + [n_after, 1]) + 1)
    col_ax.set_title(f"collectives: {n_before} before, {n_after} after "
                     f"({sum(s.action == 'remove' for s in plan.sites)} removed)")
    col_ax.legend(fontsize=8)

    # Middle: bytes a rank holds, by TP layout: the memory price of removing the collectives.
    tp_total, adp_total = weight_bytes(plan)
    stack = [0.0, 0.0]
    for layout in ("column", "row", "vocab", "replicated"):
        specs = [p for p in plan.params if p.layout == layout]
        local = sum(math.prod(p.local_shape) * getattr(torch, p.dtype).itemsize for p in specs)
        full = sum(math.prod(p.held_shape) * getattr(torch, p.dtype).itemsize for p in specs)
        if local or full:
            mem_ax.bar(["TP shard", "rewritten"], [local / 1e6, full / 1e6], 0.5,
                       bottom=stack, label=f"{layout} ({len(specs)})")
            stack = [stack[0] + local / 1e6, stack[1] + full / 1e6]
    mem_ax.set_ylabel(f"weights per rank (MB, {traced_dtypes(plan)} as traced)")
    mem_ax.set_title(f"weights: {tp_total / 1e6:.1f} -> {adp_total / 1e6:.1f} MB "
                     f"({adp_total / max(tp_total, 1):.1f}x)")
    mem_ax.legend(fontsize=8)

    # Right: what the rewrite removed, fixed or made full.
    multiplied = sum(1 for f in plan.shape_fixes if f.multiply)
    changes = {
        "collectives removed": sum(s.action == "remove" for s in plan.sites),
        "collectives kept (regrouped)": sum(s.action == "keep" for s in plan.sites),
        "gather + scatter inserted": sum(s.action == "gather_scatter" for s in plan.sites),
        "shape constants replaced": len(plan.shape_fixes) - multiplied,
        "symbolic sizes multiplied": multiplied,
        "views made reshape": len(plan.views_to_copy),
        "parameters regrouped": sum(1 for p in plan.params
                                    if p.layout != "replicated" and p.held_shape != p.local_shape),
        "unclassified (kept)": len(plan.unclassified),
    }
    names = list(changes)[::-1]
    bars = fix_ax.barh(names, [changes[n] for n in names], color="tab:green")
    fix_ax.bar_label(bars, fontsize=8)
    fix_ax.tick_params(axis="y", labelsize=8)
    fix_ax.set_title(f"changes: {sum(changes.values()) - len(plan.unclassified)} edits")

    fig.suptitle(f"rank {plan.rank}, {plan.mapping}: {len(layers)} layers, "
                 f"{n_before} -> {n_after} collectives, weights {adp_total / max(tp_total, 1):.1f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
