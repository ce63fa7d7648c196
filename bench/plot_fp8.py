"""FP8 against bf16 decode, side by side: the step of each bench_decode JSON beside its roofline.

Each argument is ``LABEL=BF16.json,FP8.json``, two rows of one workload measured in one device
call (compare only rows of one call); the bars are the measured steps, the dark marks their
rooflines (weights + KV a step reads over the copy bandwidth), and the figure above a pair its
FP8 / bf16 ratio.

    python bench/plot_fp8.py docs/img/fp8-vs-bf16-h100.png \\
        "Qwen3-32B, 32 layers, 64 x 512=bench/results/decode-qwen3-32b-32layers-h100x1-64.json,bench/results/decode-qwen3-32b-32layers-fp8-h100x1-64.json" ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(path: str) -> tuple[float, float]:
    """(step ms, roofline ms) of one bench_decode JSON."""
    roofline = json.loads(Path(path).read_text())["roofline"]
    return roofline["step_ms"], roofline["roofline_ms"]


def main() -> None:
    if len(sys.argv) < 3 or any("=" not in a or "," not in a for a in sys.argv[2:]):
        sys.exit(__doc__)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, pairs = Path(sys.argv[1]), [a.split("=", 1) for a in sys.argv[2:]]
    fig, ax = plt.subplots(figsize=(2.2 * len(pairs) + 2, 4.2))
    width = 0.38
    rows = [[row(f) for f in files.split(",")] for _, files in pairs]
    tallest = max(step for pair in rows for step, _ in pair)
    for i, ((label, _), (bf16, fp8)) in enumerate(zip(pairs, rows)):
        for offset, (step, roof), colour, name in ((-width / 2, bf16, "#4c72b0", "bf16"),
                                                   (width / 2, fp8, "#dd8452", "FP8")):
            ax.bar(i + offset, step, width, color=colour, label=name if i == 0 else None)
            ax.hlines(roof, i + offset - width / 2, i + offset + width / 2, colors="black",
                      linewidth=2, label="roofline" if i == 0 and name == "bf16" else None)
            ax.text(i + offset, step, f"{step:.2f}\n({step / roof:.2f}x)", ha="center",
                    va="bottom", fontsize=7)
        top = max(bf16[0], fp8[0])
        ax.text(i, top + 0.16 * tallest, f"FP8/bf16 {fp8[0] / bf16[0]:.2f}", ha="center", fontsize=8,
                fontweight="bold")
    ax.set_xticks(range(len(pairs)), [label for label, _ in pairs], fontsize=8)
    ax.set_ylabel("decode step, ms (x its roofline)")
    ax.set_ylim(0, tallest * 1.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("FP8 weights against bf16, one GPU, rows of one call each", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
