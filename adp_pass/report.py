"""What ``adp rewrite --out`` writes: the plan, a text report, both graphs, and a picture."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
import torch.fx as fx

from adp_pass.patterns.structure import (
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
    """Node counts by category and the parameter elements a rank holds."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        category = next((name for name, ops in _CATEGORIES if node.target in ops), "other")
        counts[category] += 1
    params = sum(p.numel() for p in gm.parameters())
    return {"nodes": len(gm.graph.nodes), "ops": dict(counts), "param_elements": params}


def weight_bytes(plan: Plan) -> tuple[int, int]:
    """Bytes of the parameters one rank holds: (TP shard, attention-DP full)."""
    def size(shape, dtype):
        return math.prod(shape) * getattr(torch, dtype).itemsize

    tp = sum(size(p.local_shape, p.dtype) for p in plan.params)
    return tp, sum(size(p.full_shape, p.dtype) for p in plan.params)


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


def plot_before_after(path: Path, plan: Plan, before: dict, after: dict) -> Path:
    """Two panels: graph ops by category, and parameter elements per rank by TP layout,
    before vs after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ops_ax, layer_ax) = plt.subplots(1, 2, figsize=(11, 4))
    names = [name for name, _ in _CATEGORIES] + ["other"]
    xs = range(len(names))
    ops_ax.bar([x - 0.2 for x in xs], [before["ops"].get(n, 0) for n in names], 0.4, label="TP")
    ops_ax.bar([x + 0.2 for x in xs], [after["ops"].get(n, 0) for n in names], 0.4,
               label="attention-DP")
    ops_ax.set_xticks(list(xs), names)
    ops_ax.set_ylabel("graph nodes")
    ops_ax.set_title(f"rank {plan.rank}: graph before / after ({plan.mapping})")
    ops_ax.legend()

    # Right: what a rank holds, by TP layout: the memory price of removing the collectives.
    layouts = ("column", "row", "vocab", "replicated")
    bottom = [0.0, 0.0]
    for layout in layouts:
        local = sum(math.prod(p.local_shape) for p in plan.params if p.layout == layout) / 1e6
        full = sum(math.prod(p.full_shape) for p in plan.params if p.layout == layout) / 1e6
        if local or full:
            layer_ax.bar(["TP shard", "attention-DP"], [local, full], 0.5, bottom=bottom,
                         label=layout)
            bottom = [bottom[0] + local, bottom[1] + full]
    layer_ax.set_ylabel("parameter elements per rank (millions)")
    layer_ax.set_title(f"{len(plan.sites)} collectives removed, {plan.num_layers} layers")
    layer_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

