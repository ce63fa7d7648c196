"""Pictures for docs: which rank holds what under each mapping, and measured tokens/s.

    python bench/plot_mappings.py layout docs/img/mappings.png
    python bench/plot_mappings.py results bench/results/mappings-qwen3-8b-2.json \\
        docs/img/mappings-qwen3-8b-2.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from adp_pass.mapping import Mapping  # noqa: E402

LAYOUTS = ["tp=4,attn_dp=0", "tp=4,attn_dp=1", "tp=4,attn_dp=1,mlp_tp=4",
           "tp=4,attn_dp=1,mlp_tp=2", "tp=4,attn_dp=1,attn_tp=2",
           "tp=4,attn_dp=1,attn_tp=2,mlp_tp=4"]
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red"]  # one per request set


def layout(path: str) -> None:
    """One row per mapping, one column per rank: the rank's requests (colour = request set),
    its share of the attention heads and MLP columns, and the collectives between groups."""
    fig, axes = plt.subplots(len(LAYOUTS), 1, figsize=(10, 1.55 * len(LAYOUTS)))
    for ax, spec in zip(axes, LAYOUTS):
        m = Mapping.parse(spec)
        attn = m.attn_tp_size if m.enable_attention_dp else m.tp_size
        mlp = m.mlp_tp_size
        for rank in range(m.tp_size):
            x = rank * 2.5
            dp = m.dp_rank(rank) if m.enable_attention_dp else 0
            ax.add_patch(Rectangle((x, 1.1), 2.2, 0.6, color=COLORS[dp % 4], alpha=0.35))
            ax.text(x + 1.1, 1.4, f"rank {rank}: requests {dp}", ha="center", va="center", fontsize=7)
            ax.add_patch(Rectangle((x, 0.55), 2.2, 0.45, fill=False))
            heads = "all heads" if attn == 1 else f"heads {rank % attn + 1}/{attn}"
            ax.text(x + 1.1, 0.77, f"attention: {heads}", ha="center", va="center", fontsize=7)
            ax.add_patch(Rectangle((x, 0.0), 2.2, 0.45, fill=False))
            cols = "all columns" if mlp == 1 else f"columns {rank % mlp + 1}/{mlp}"
            ax.text(x + 1.1, 0.22, f"MLP: {cols}", ha="center", va="center", fontsize=7)
        for size, y, word in ((attn, 0.77, "all-reduce"), (mlp, 0.22, _mlp_word(m))):
            if size > 1 and word:
                for start in range(0, m.tp_size, size):
                    ax.plot([start * 2.5 + 0.1, (start + size) * 2.5 - 0.4], [y - 0.2, y - 0.2],
                            color="black", lw=2)
                    ax.text((start * 2.5 + (start + size) * 2.5 - 0.3) / 2, y - 0.3, word,
                            ha="center", va="top", fontsize=6)
        ax.set_xlim(-0.2, m.tp_size * 2.5)
        ax.set_ylim(-0.25, 1.75)
        ax.axis("off")
        ax.set_title(f"{spec}   ({_summary(m)})", fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _mlp_word(m: Mapping) -> str:
    if m.mlp_tp_size == 1:
        return ""
    if not m.enable_attention_dp or m.mlp_tp_size == m.attn_tp_size:
        return "all-reduce"
    return "all-gather tokens / reduce-scatter"


def _summary(m: Mapping) -> str:
    if not m.enable_attention_dp:
        return "TP: 1 request set, 2 all-reduces per layer"
    if m.lockstep_size == 1:
        return f"{m.dp_size} request sets, no collective"
    return f"{m.dp_size} request sets, ranks step in groups of {m.lockstep_size}"


def _plot_order(spec: str) -> tuple:
    m = Mapping.load(spec)
    return (m.tp_size > 1, m.enable_attention_dp, m.attn_tp_size, m.mlp_tp_size)


def results(source: str, path: str) -> None:
    doc = json.load(open(source))
    rows = [r for r in doc["rows"] if r.get("tok_s_per_gpu")]
    workloads = sorted({(r["batch_per_gpu"], r["prompt"]) for r in rows})
    # One order for every plot: TP1, TP-N, then attention-DP from the least to the most sharded.
    mappings = sorted(dict.fromkeys(r["mapping"] for r in rows), key=_plot_order)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(mappings)
    for i, spec in enumerate(mappings):
        values = [next((r["tok_s_per_gpu"] for r in rows if r["mapping"] == spec and
                        (r["batch_per_gpu"], r["prompt"]) == w), 0) for w in workloads]
        bars = ax.bar([j + i * width for j in range(len(workloads))], values, width, label=spec)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))],
                  [f"{b} req/GPU, prompt {p}" for b, p in workloads])
    ax.set_ylabel("decode tokens/s per GPU")
    gpus = max(r["gpus"] for r in rows)
    ax.set_title(f"{rows[0]['model']} bf16 on {gpus}x {doc['gpu']}, 128 new tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if sys.argv[1] == "layout":
        layout(sys.argv[2])
    else:
        results(sys.argv[2], sys.argv[3])
