"""Decode GEMMs by weight layout: which way of storing a projection reads it fastest.

At decode batch sizes a projection is a weight read. The rewritten graph computes
``mm(x, t(W))`` with ``W`` stored ``[out, in]`` as in the checkpoint (cuBLAS "TN"); storing it
``[in, out]`` (``mm(x, W_t)``, "NN") or letting cuBLAS pick through ``F.linear`` can select other
kernels. Each shape of Qwen3-8B's step is timed per layout, rotating over enough weight copies
that none is served from L2, and reported as weight bandwidth.

    python bench/bench_gemm_layouts.py --out bench/results/gemm-layouts-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_timing import loop_ms
from results_file import versions

# (name, out features, in features) of one Qwen3-8B layer with q|k|v and gate|up fused, and
# the LM head.
SHAPES = [
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 24576, 4096),
    ("down", 4096, 12288),
    ("lm_head", 151936, 4096),
]


def time_layout(fn, weights: list[torch.Tensor], x: torch.Tensor, iters: int) -> float:
    """Mean ms per call, cycling through ``weights``."""
    for w in weights[:2]:
        fn(x, w)
    torch.cuda.synchronize()
    return loop_ms(lambda i: fn(x, weights[i % len(weights)]), iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device, dtype = torch.device("cuda"), torch.bfloat16
    layouts = {
        "mm(x, t(W)) [out,in]": (lambda x, w: torch.mm(x, w.t()), False),
        "mm(x, W) [in,out]": (lambda x, w: torch.mm(x, w), True),
        "F.linear [out,in]": (lambda x, w: F.linear(x, w), False),
    }
    rows = []
    for name, out_features, in_features in SHAPES:
        nbytes = out_features * in_features * 2
        copies = max(2, -(-256 * 2**20 // nbytes))  # >= 256 MiB in rotation: past the L2
        stored = [torch.randn(out_features, in_features, device=device, dtype=dtype)
                  for _ in range(copies)]
        transposed = [w.t().contiguous() for w in stored]
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, in_features, device=device, dtype=dtype)
            for layout, (fn, wants_transposed) in layouts.items():
                ms = time_layout(fn, transposed if wants_transposed else stored, x, args.iters)
                rows.append({"shape": name, "out": out_features, "in": in_features,
                             "batch": batch, "layout": layout, "ms": round(ms, 4),
                             "tb_s": round(nbytes / ms / 1e9, 3)})
                print(f"{name:8s} M={batch:<4d} {layout:24s} {ms * 1e3:8.1f} us "
                      f"{nbytes / ms / 1e9:6.2f} TB/s", flush=True)
        del stored, transposed
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({
            "gpu": torch.cuda.get_device_name(0), "versions": versions(),
            "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
