"""Where the answer flips: the best mapping over requests per GPU x context (``adp plan --sweep``).

For one model, GPU count and profile, every cell (requests per GPU 8..512, context 512..32k:
the prompt; ``new_tokens`` more are generated) gets the mapping with the most tokens/s per GPU
that fits, its margin over the runner-up, and whether that pick survives the collective
latencies and the host's work per request at the low and at the high end of their stated
ranges (``Prediction.step_ms_range``); cells where it does not are hatched in the picture.
matplotlib is imported only to draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adp_pass.cost_model import Calibration, rank_mappings, short_name

REQUESTS = (8, 16, 32, 64, 128, 256, 512)
CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass
class Cell:
    requests: int
    context: int
    pick: str | None  # None: nothing fits
    margin: float  # pick's tok/s over the runner-up's, - 1
    runner_up: str | None
    stable: bool  # the same pick with every latency low, and with every latency high
    tok_s: dict[str, float] = field(default_factory=dict)  # fitting mappings only


@dataclass
class Sweep:
    gpus: int
    gpu: str
    weights: str
    kv_cache: str
    new_tokens: int
    cells: list[Cell]

    def cell(self, requests: int, context: int) -> Cell:
        return next(c for c in self.cells if c.requests == requests and c.context == context)

    def as_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "gpu": self.gpu, "weights": self.weights,
                "kv_cache": self.kv_cache, "new_tokens": self.new_tokens,
                "requests_per_gpu": list(REQUESTS), "contexts": list(CONTEXTS),
                "cells": [c.__dict__ for c in self.cells]}

    def summary(self) -> str:
        lines = [f"best mapping per cell ({self.gpus} x {self.gpu}; rows: context, columns: "
                 "requests per GPU; * = the pick changes inside the latency and host-work "
                 "ranges)"]
        lines.append(f"{'context':>8} " + " ".join(f"{r:>22}" for r in REQUESTS))
        for context in CONTEXTS:
            row = []
            for requests in REQUESTS:
                c = self.cell(requests, context)
                text = "-" if c.pick is None else (
                    _short(c.pick) + f" +{c.margin:.0%}" + ("*" if not c.stable else ""))
                row.append(f"{text:>22}")
            lines.append(f"{context:>8} " + " ".join(row))
        return "\n".join(lines)


def _short(name: str) -> str:
    """A legend-sized name: TP8, ADP (replicated), ADP a2 m4 ..."""
    if "attn_dp" not in name:
        return name.replace("tp=", "TP")
    parts = dict(kv.split("=") for kv in name.split(","))
    text = "ADP"
    if parts.get("attn_tp"):
        text += f" a{parts['attn_tp']}"
    if parts.get("mlp_tp"):
        text += f" m{parts['mlp_tp']}"
    return text + (" repl." if text == "ADP" else "")


def sweep(config: Any, gpus: int, *, calibration: Calibration, weights: str = "bf16",
          kv_cache: str = "bf16", new_tokens: int = 128,
          max_position: int | None = None) -> Sweep:
    cells = []
    for context in CONTEXTS:
        for requests in REQUESTS:
            if max_position and context + new_tokens > max_position:
                cells.append(Cell(requests, context, None, 0.0, None, True))
                continue
            ranked = rank_mappings(config, gpus, batch_per_gpu=requests, prompt=context,
                                   new_tokens=new_tokens, calibration=calibration,
                                   weights=weights, kv_cache=kv_cache)
            fitting = [p for _, p in ranked if p.fits and not (p.reference and gpus > 1)]
            if not fitting:
                cells.append(Cell(requests, context, None, 0.0, None, True))
                continue
            best = fitting[0]
            second = fitting[1] if len(fitting) > 1 else None
            margin = best.tok_s_per_gpu / second.tok_s_per_gpu - 1 if second else 0.0
            stable = all(min(fitting, key=lambda p: p.step_ms_range[end]) is best
                         for end in (0, 1))
            cells.append(Cell(requests, context, best.name, margin,
                              None if second is None else second.name, stable,
                              {p.name: p.tok_s_per_gpu for p in fitting}))
    return Sweep(gpus, calibration.name, weights, kv_cache, new_tokens, cells)


def draw_sweep(result: Sweep, out: Path, title: str, line_context: int = 2048) -> Path:
    """Left: the pick per cell, coloured by mapping, the margin written in, hatched where the
    latency and host-work ranges change it. Right: tokens/s per GPU of each mapping over
    requests per GPU at ``line_context``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    picks = sorted({c.pick for c in result.cells if c.pick}, key=_order)
    palette = plt.get_cmap("tab10")
    colour = {name: palette(i % 10) for i, name in enumerate(picks)}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [1.15, 1]})
    for c in result.cells:
        x, y = REQUESTS.index(c.requests), CONTEXTS.index(c.context)
        face = colour.get(c.pick, (0.85, 0.85, 0.85, 1))
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor=face, edgecolor="white", linewidth=1.5,
                               hatch=None if c.stable else "///"))
        label = "no fit" if c.pick is None else f"+{c.margin:.0%}"
        ax.text(x + 0.5, y + 0.5, label, ha="center", va="center", fontsize=8,
                color="black")
    ax.set_xlim(0, len(REQUESTS))
    ax.set_ylim(0, len(CONTEXTS))
    ax.set_xticks([i + 0.5 for i in range(len(REQUESTS))], [str(r) for r in REQUESTS])
    ax.set_yticks([i + 0.5 for i in range(len(CONTEXTS))],
                  [f"{c // 1024}k" if c >= 1024 else str(c) for c in CONTEXTS])
    ax.set_xlabel("requests per GPU")
    ax.set_ylabel(f"context (prompt; + {result.new_tokens} new tokens)")
    ax.set_title("best mapping (margin over the runner-up)", fontsize=10)
    handles = [Patch(facecolor=colour[p], label=p) for p in picks]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                         label="pick changes inside the latency / host-work ranges"))
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              ncol=2, frameon=False)

    names = sorted({n for c in result.cells if c.context == line_context for n in c.tok_s},
                   key=_order)
    line_colours = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        xs = [r for r in REQUESTS if name in result.cell(r, line_context).tok_s]
        ys = [result.cell(r, line_context).tok_s[name] for r in xs]
        ax2.plot(xs, ys, marker="o", markersize=3, label=name,
                 color=colour.get(name, line_colours(i % 20)),
                 linewidth=2.2 if name in colour else 1.0,
                 linestyle="-" if name in colour else "--")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(list(REQUESTS), [str(r) for r in REQUESTS])
    ax2.set_xlabel("requests per GPU")
    ax2.set_ylabel("predicted decode tokens/s per GPU")
    ax2.set_title(f"every mapping that fits, context {line_context}", fontsize=10)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13),
               frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _order(name: str) -> tuple:
    return (name.startswith("tp=") and "attn_dp" in name, name)


__all__ = ["sweep", "draw_sweep", "Sweep", "Cell", "short_name"]
