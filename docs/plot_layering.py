"""Draw docs/img/layering.png: the module layers and the imports between them.

The layers and what each may import are the table ``tests/test_layering.py`` enforces; the
arrows are the imports the code has now (read with ``ast``), so the picture is redrawn, never
edited::

    python3 docs/plot_layering.py            # writes docs/img/layering.png
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import test_layering as layering  # noqa: E402  (the table the test enforces)

# What each layer is, in a few words, under its name.
ROLES = {
    "foundation": "mapping, families, errors, FX vocabulary",
    "plan": "plain data: sites, params, shape fixes",
    "capture": "TP model -> ATen graph",
    "patterns": "one pattern per collective site",
    "sharding": "which dims grow; shape fixes, proof",
    "detect": "graph + mapping -> plan",
    "rewrite": "plan -> attention-DP graph",
    "lower": "Triton ops, KV-cache insertion",
    "runtime": "weights, KV cache, engine, build cache",
    "entry": "pipeline runner, CLI, verify, backend, prepare",
}


def _short(module: str) -> str:
    if module in ("adp_pass", "adp_pass.runtime"):  # package __init__ files
        return module.replace("adp_pass.", "") + "/__init__"
    return module.removeprefix("adp_pass.").removeprefix("runtime.")


def layer_members() -> dict[str, list[str]]:
    members: dict[str, list[str]] = {layer: [] for layer in layering.ORDER}
    for module in sorted(layering.MODULES):
        members[layering.layer_of(module)].append(module)
    return members


def layer_edges() -> Counter:
    """(importer layer, imported layer) -> number of module imports, between different layers."""
    edges: Counter = Counter()
    for module, path in layering.MODULES.items():
        src = layering.layer_of(module)
        for target in {t for t, _ in layering._imports(module, path)}:
            dst = layering.layer_of(target)
            if dst != src:
                edges[src, dst] += 1
    return edges


def _members_text(modules: list[str], width: int = 62) -> str:
    names = sorted({_short(m).split(".")[0] if ".kernels." in m or ".families." in m
                    or ".lower." in m or ".patterns." in m or ".serving." in m else _short(m)
                    for m in modules})
    lines, line = [], ""
    for name in names:
        piece = name if not line else f", {name}"
        if len(line) + len(piece) > width:
            lines.append(line + ",")
            line = name
        else:
            line += piece
    return "\n".join(lines + [line])


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    members, edges = layer_members(), layer_edges()
    order = layering.ORDER
    step, height, box_w = 1.25, 1.0, 6.2
    y_of = {layer: i * step for i, layer in enumerate(order)}
    fig, ax = plt.subplots(figsize=(12, 13.5))
    for layer in order:
        y = y_of[layer]
        ax.add_patch(FancyBboxPatch((0, y), box_w, height, boxstyle="round,pad=0.02",
                                    facecolor="#eef3fb" if layer != "entry" else "#fbf1e6",
                                    edgecolor="#4a6fa5"))
        ax.text(0.15, y + height - 0.2, f"{layer}", fontsize=11, weight="bold", va="top")
        ax.text(1.55, y + height - 0.22, ROLES[layer], fontsize=8.5, style="italic", va="top",
                color="#333333")
        ax.text(0.15, y + height - 0.5, _members_text(members[layer]), fontsize=7.2, va="top",
                family="monospace")
    # Imports point from the importer (above) down to the layer it imports, bent further out
    # the more layers they skip, so they stay apart; thicker: more modules import that way.
    for (src, dst), count in edges.items():
        skip = order.index(src) - order.index(dst)
        ax.add_patch(FancyArrowPatch(
            (box_w, y_of[src] + 0.5), (box_w, y_of[dst] + 0.5),
            connectionstyle=f"arc3,rad={-0.22 - 0.05 * skip}", arrowstyle="-|>",
            mutation_scale=9, linewidth=0.5 + 0.2 * min(count, 8), color="#4a6fa5", alpha=0.5))
    ax.annotate("imports point down the pipeline only (tests/test_layering.py)",
                (0, -0.35), fontsize=9, color="#333333")
    ax.set_xlim(-0.2, box_w + 4.6)
    ax.set_ylim(-0.6, y_of[order[-1]] + height + 0.3)
    ax.axis("off")
    ax.set_title("adp-pass module layers: each layer imports only the layers below it that it "
                 "lists", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(plot(ROOT / "docs" / "img" / "layering.png"))
