"""Tiles, split-K and pipeline depth for ``adp::decode_mm``, against cuBLAS, per decode shape.

Each (shape, rows) pair is timed for every configuration of the grid and for ``torch.mm(x, W.T)``
(cuBLAS, the runtime's default), inside a CUDA graph that cycles through enough weight copies
that none is served from L2 (the decode step reads each weight once). Reported as weight
bandwidth. Kernels are compiled first by a pool of processes (Triton's disk cache), so the sweep
itself only times.

    python3 bench/tune_decode_mm.py --out bench/results/tune-decode-mm-h200.json

The ``TUNED`` table of ``runtime/kernels/decode_mm.py`` is printed at the end: a configuration
for each (shape, rows bucket) where the kernel beat cuBLAS by more than ``--min-gain``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

from gpu_timing import graph_ms
from results_file import versions

# (name, out features N, in features K) with q|k|v and gate|up fused, as the runtime runs them.
SHAPES = {
    "qwen3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 24576, 4096),
                 ("down", 4096, 12288), ("lm_head", 151936, 4096)],
    "qwen3-32b": [("qkv", 10240, 5120), ("o", 5120, 8192), ("gate_up", 51200, 5120),
                  ("down", 5120, 25600), ("lm_head", 151936, 5120)],
}


def grid() -> list:
    from adp_pass.runtime.kernels.decode_mm import DecodeMMConfig

    return [DecodeMMConfig(block_n=bn, block_k=bk, split_k=s, num_stages=st, num_warps=w)
            for bn, bk, s, st, w in itertools.product(
                (32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (3, 4, 6), (4,))
            if not (bk == 256 and st == 6)]  # over the shared-memory budget at block_n 128


def _compile(jobs: list) -> int:
    """Worker: launch each (config, rows) once on small tensors to fill Triton's disk cache."""
    import adp_pass.runtime  # noqa: F401
    from adp_pass.runtime.kernels.decode_mm import launch

    compiled = 0
    for config, rows in jobs:
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
        try:
            launch(x, w, config)
            torch.cuda.synchronize()
            compiled += 1
        except Exception:  # noqa: BLE001  (an over-budget config: skipped in the sweep too)
            pass
    return compiled


def time_per_call(fn, x: torch.Tensor, weights: list[torch.Tensor], replays: int) -> float:
    """Mean ms per ``fn(x, w)`` inside a CUDA graph over ``weights``."""
    for w in weights[:2]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    return graph_ms(graph, replays) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="qwen3-8b,qwen3-32b")
    parser.add_argument("--rows", default="16,32,64", help="the row buckets of decode_mm")
    parser.add_argument("--only", default="",
                        help="shape names to time (e.g. o,down); default all")
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--min-gain", type=float, default=0.03)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import adp_pass.runtime  # noqa: F401
    from adp_pass.runtime.kernels.decode_mm import launch

    configs = grid()
    rows_list = [int(r) for r in args.rows.split(",")]
    started = time.perf_counter()
    jobs = list(itertools.product(configs, rows_list))
    chunks = [jobs[i::args.workers] for i in range(args.workers)]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        compiled = sum(pool.map(_compile, chunks))
    print(f"compiled {compiled}/{len(jobs)} kernels in {time.perf_counter() - started:.0f} s",
          flush=True)

    device, dtype = torch.device("cuda"), torch.bfloat16
    results, tuned = [], {}
    for model in args.models.split(","):
        shapes = [s for s in SHAPES[model] if not args.only or s[0] in args.only.split(",")]
        for name, n, k in shapes:
            nbytes = n * k * 2
            copies = max(2, -(-512 * 2**20 // nbytes))  # >= 512 MiB in rotation: past the L2
            weights = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
            for rows in rows_list:
                x = torch.randn(rows, k, device=device, dtype=dtype)
                cublas_ms = time_per_call(lambda x, w: torch.mm(x, w.t()), x, weights,
                                          args.replays)
                timed = []
                for config in configs:
                    try:
                        ms = time_per_call(lambda x, w, c=config: launch(x, w, c), x, weights,
                                           args.replays)
                    except Exception:  # noqa: BLE001
                        continue
                    timed.append((ms, config))
                timed.sort(key=lambda t: t[0])
                best_ms, best = timed[0]
                ref = torch.mm(x, weights[0].t()).float()
                err = (launch(x, weights[0], best).float() - ref).abs().max().item()
                row = {
                    "model": model, "shape": name, "n": n, "k": k, "rows": rows,
                    "cublas_ms": round(cublas_ms, 5), "cublas_tb_s": round(nbytes / cublas_ms / 1e9, 3),
                    "best_ms": round(best_ms, 5), "best_tb_s": round(nbytes / best_ms / 1e9, 3),
                    "best": vars(best), "speedup": round(cublas_ms / best_ms, 3),
                    "max_abs_diff_vs_cublas": err, "ref_max_abs": ref.abs().max().item(),
                    "top5": [{"ms": round(ms, 5), **vars(c)} for ms, c in timed[:5]],
                }
                results.append(row)
                print(f"{model:9s} {name:8s} rows={rows:<3d} cuBLAS {cublas_ms * 1e3:7.1f} us "
                      f"{row['cublas_tb_s']:5.2f} TB/s | best {best_ms * 1e3:7.1f} us "
                      f"{row['best_tb_s']:5.2f} TB/s x{row['speedup']:.3f} {vars(best)} "
                      f"err {err:.3g}", flush=True)
                if cublas_ms / best_ms > 1 + args.min_gain:
                    tuned.setdefault((n, k), {})[rows] = best
            del weights
            torch.cuda.empty_cache()
            save(args.out, results, started)  # a run cut short keeps the shapes done
    print("\nTUNED = {")
    for (n, k), by_rows in tuned.items():
        entries = ", ".join(
            f"{rows}: DecodeMMConfig({c.block_n}, {c.block_k}, {c.split_k}, {c.num_stages}, "
            f"{c.num_warps})" for rows, c in sorted(by_rows.items()))
        print(f"    ({n}, {k}): {{{entries}}},")
    print("}")
    save(args.out, results, started)


def save(out: Path | None, results: list, started: float) -> None:
    if out is None:
        return

    out.write_text(json.dumps({
        "gpu": torch.cuda.get_device_name(0), "versions": versions(),
        "command": " ".join(sys.argv), "seconds": round(time.perf_counter() - started, 1),
        "rows": results}, indent=1))


if __name__ == "__main__":
    main()
