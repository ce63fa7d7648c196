"""Does ``adp.prefetch_l2`` put a weight in L2, and what does a decode GEMM gain from it?

For each projection shape and prefetch mode: flush L2 (write a buffer larger than it), prefetch
the first BYTES of the weight, let the GPU idle for ``--idle-us`` (``torch.cuda._sleep``) so the
prefetch can land, then time ``x @ W.T`` alone (all queued, no host sync between) for ``--rows`` rows with CUDA events. ``off`` is
the cold GEMM. Also the prefetch kernel's own time (issue only) and the GEMM right after the
prefetch with no idle time.

    python bench/bench_prefetch.py --out bench/results/prefetch-h200.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from results_file import versions, write_result

SHAPES = {  # (out, in) of Qwen3-8B's decode projections after fusion
    "o_proj": (4096, 4096),
    "qkv": (6144, 4096),
    "down": (4096, 12288),
    "gate_up": (24576, 4096),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--idle-us", type=float, default=40.0)
    parser.add_argument("--mib", default="8,16,32,48", help="prefetch caps to try, MiB")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from adp_pass.runtime.kernels import prefetch

    device = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(device)
    flush = torch.empty(4 * props.L2_cache_size, dtype=torch.uint8, device=device)
    # Cycles for the idle wait: _sleep spins for a clock-cycle count.
    cycles = int(args.idle_us * 1e-6 * props.clock_rate * 1e3) if hasattr(props, "clock_rate") \
        else int(args.idle_us * 1.98e3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    mark, issued, start2, end2 = (torch.cuda.Event(enable_timing=True) for _ in range(4))
    rows = []
    caps = [int(float(m) * (1 << 20)) for m in args.mib.split(",")]
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
        x = torch.randn(args.rows, in_features, device=device, dtype=torch.bfloat16)
        nbytes = weight.numel() * 2
        plans = [("off", 0)] + [(mode, cap) for mode in ("bulk", "lines")
                                 for cap in sorted({min(c, nbytes) for c in caps} | {nbytes})]
        for mode, cap in plans:
            gemm_ms, issue_ms, back_to_back_ms = [], [], []
            try:
                for _ in range(args.reps + 3):
                    # Everything queued, one sync at the end: the GPU never waits for the host
                    # between the kernels timed.
                    flush.fill_(1)
                    mark.record()
                    prefetch.prefetch(weight, cap, mode)
                    issued.record()
                    torch.cuda._sleep(cycles)
                    start.record()
                    F.linear(x, weight)
                    end.record()
                    flush.fill_(1)
                    start2.record()
                    prefetch.prefetch(weight, cap, mode)
                    F.linear(x, weight)
                    end2.record()
                    torch.cuda.synchronize()
                    issue_ms.append(mark.elapsed_time(issued))
                    gemm_ms.append(start.elapsed_time(end))
                    back_to_back_ms.append(start2.elapsed_time(end2))
            except Exception as err:  # noqa: BLE001 - report the mode that failed, go on
                rows.append({"shape": name, "mode": mode, "mib": cap / (1 << 20),
                             "error": f"{type(err).__name__}: {err}"[:400]})
                print(f"{name} {mode} {cap >> 20} MiB: {err}", flush=True)
                torch.cuda.synchronize()
                continue
            med = lambda v: statistics.median(v[3:])  # noqa: E731
            row = {"shape": name, "out": out_features, "in": in_features, "rows": args.rows,
                   "mode": mode, "mib": round(cap / (1 << 20), 1),
                   "gemm_us": round(med(gemm_ms) * 1e3, 2),
                   "gemm_tb_s": round(nbytes / (med(gemm_ms) * 1e-3) / 1e12, 3),
                   "issue_us": round(med(issue_ms) * 1e3, 2),
                   "prefetch_then_gemm_us": round(med(back_to_back_ms) * 1e3, 2)}
            rows.append(row)
            print(f"{name:8} {mode:5} {row['mib']:7.1f} MiB: GEMM {row['gemm_us']:7.2f} us "
                  f"({row['gemm_tb_s']:.2f} TB/s), prefetch issue {row['issue_us']:.2f} us, "
                  f"prefetch+GEMM {row['prefetch_then_gemm_us']:.2f} us", flush=True)
    result = {"gpu": torch.cuda.get_device_name(0), "versions": versions(),
              "command": " ".join(sys.argv), "l2_bytes": props.L2_cache_size,
              "idle_us": args.idle_us, "rows": rows}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
