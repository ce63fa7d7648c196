"""Where a decode step's time goes, before and after: stacked bars from profile_decode JSONs.

Each bar is one ``bench/profile_decode.py`` result: its eager per-kernel times grouped into
GEMMs, paged attention and the small fused kernels, plus the host time the engine step spends
beyond the graph replay; a line marks the HBM roofline.

    python bench/plot_decode_breakdown.py docs/img/decode-breakdown-h200.png \\
        "old kernel=bench/results/profile-decode-qwen3-8b-64x512-old-kernel.json" ...
"""

from __future__ import annotations

import json
import sys


def category(kernel: str) -> str:
    if kernel.startswith(("nvjet", "void cublas", "sm90_xmma", "ampere_", "cutlass",
                          "_decode_mm", "_split_k_sum")):
        return "GEMMs (cuBLAS, decode_mm)"
    if "paged_decode" in kernel or "varlen" in kernel or "_reduce_kernel" in kernel:
        return "paged attention"
    return "norms, rotary, silu, cache write, other"


def breakdown(result: dict) -> dict[str, float]:
    parts: dict[str, float] = {}
    for row in result["kernels"]:
        key = category(row["kernel"])
        parts[key] = parts.get(key, 0.0) + row["ms_per_step"]
    parts["host (engine step - replay)"] = max(0.0, result["engine_step_ms"] - result["replay_ms"])
    return parts


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, specs = sys.argv[1], sys.argv[2:]
    labels, results = [], []
    for spec in specs:
        label, path = spec.split("=", 1)
        labels.append(label)
        results.append(json.load(open(path)))
    order = ["GEMMs (cuBLAS, decode_mm)", "paged attention", "norms, rotary, silu, cache write, other",
             "host (engine step - replay)"]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(results)))
    for row, result in enumerate(results):
        left = 0.0
        for name, color in zip(order, colors):
            width = breakdown(result).get(name, 0.0)
            ax.barh(row, width, left=left, color=color, label=name if row == 0 else None)
            if width > 0.25:
                ax.text(left + width / 2, row, f"{width:.2f}", ha="center", va="center",
                        color="white", fontsize=8)
            left += width
        ax.text(left + 0.05, row, f"{result['engine_step_ms']:.2f} ms", va="center", fontsize=9)
    roofline = results[-1]["roofline_ms"]
    ax.axvline(roofline, color="black", linestyle="--", linewidth=1)
    ax.text(roofline, -0.62, f"roofline {roofline:.2f} ms", ha="center", fontsize=8)
    ax.set_yticks(range(len(results)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step (eager kernel times + host time beyond the graph replay)")
    first = results[0]
    ax.set_title(f"{first['preset']} decode step, {first['batch']} requests x prompt "
                 f"{first['prompt_len']}, {first['gpu']}", fontsize=10)
    ax.set_xlim(0, max(r["engine_step_ms"] for r in results) * 1.15)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8,
              frameon=False)
    ax.set_title(ax.get_title(), pad=14)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
