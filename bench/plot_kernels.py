"""Plot a kernels benchmark JSON: GB/s against tokens, one panel per kernel.

    python bench/plot_kernels.py bench/results/kernels-h200-cudagraphs.json docs/img/kernels-h200.png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(source: str, target: str) -> None:
    data = json.load(open(source))
    series: dict = defaultdict(lambda: defaultdict(list))
    for row in data["rows"]:
        series[row["kernel"]][row["impl"]].append((row["tokens"], row["gbps"]))
    kernels = list(series)
    fig, axes = plt.subplots(1, len(kernels), figsize=(4 * len(kernels), 3.6), sharey=True)
    for ax, kernel in zip(axes, kernels):
        for impl, points in series[kernel].items():
            tokens, gbps = zip(*sorted(points))
            ax.plot(tokens, gbps, marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_title(kernel)
        ax.set_xlabel("tokens")
    axes[0].set_ylabel("GB/s")
    axes[-1].legend()
    meta = data["metadata"]
    fig.suptitle(f"{meta['gpu']}, {meta['dtype']}, Qwen3-8B sizes, device time in CUDA graphs")
    fig.tight_layout()
    fig.savefig(target, dpi=100)


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
