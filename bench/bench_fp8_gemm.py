"""FP8 block-scaled linears (``adp.fp8_block_linear``) against bf16 ``torch.matmul``,
``adp.decode_mm`` and ``torch._scaled_mm``, on Qwen3-8B / Qwen3-32B projection shapes.

    python bench/bench_fp8_gemm.py                  # one H100/H200, about 3 minutes
    python bench/bench_fp8_gemm.py --no-sweep       # without the tuning sweeps
    python bench/bench_fp8_gemm.py --dry-run        # CPU smoke test (interpreter, tiny shapes)

For each (shape, rows) every variant is first checked against ``adp_pass.fp8`` (fp8 variants:
``fp8_linear_reference``; bf16 ones: the fp32 product of the bf16 operands; ``rel`` =
||out - ref|| / ||ref|| on up to 128 rows) and then timed: rows <= 256 inside a CUDA graph that
cycles through enough weight copies (>= 512 MiB) that none is served from L2, as a decode step
reads each weight once; prefill rows with ``triton.testing.do_bench`` (median). Reported: us per
call, weight-stream GB/s (weight bytes / time: fp8 1 byte per element + its scales, bf16 2) as a
fraction of the measured device copy bandwidth (read + write of a 1 GiB buffer), and TFLOP/s.

Variants: ``bf16`` (torch.matmul), ``decode_mm`` (bf16, where its TUNED table has the shape),
``fp8`` (the op as shipped: ``fp8_gemm.choose``), ``fp8-decode`` / ``fp8-triton`` /
``fp8-scaled_mm`` (each backend forced), each also with ``:q`` (x already fp8, as after a fused
``rms_norm_fp8``/``silu_mul_fp8``: the GEMM alone). The sweeps time the decode kernel's
(block_n, split_k, num_stages, num_warps; ``--sweep-*`` set the grid) and a few prefill tiles.
The JSON (``--out``; default ``$OUT/fp8-gemm-<gpu>.json``, or ``bench/results/`` when ``$OUT``
is unset) holds every row, the sweeps, the suggested ``TUNED`` table and the versions; a short
table is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import graph_ms  # noqa: E402
from results_file import write_result  # noqa: E402

from adp_pass import fp8  # noqa: E402
from adp_pass.runtime.kernels import decode_mm as dmm  # noqa: E402
from adp_pass.runtime.kernels import fp8_gemm as G  # noqa: E402
from adp_pass.runtime.kernels import fp8_quant as Q  # noqa: E402

# (name, N out features, K in features), as the brief of issue #25 lists them; --fused adds the
# runtime's fused q|k|v and gate|up.
SHAPES = {
    "qwen3-8b": [("q|o", 4096, 4096), ("k|v", 1024, 4096), ("gate|up", 12288, 4096),
                 ("down", 4096, 12288)],
    "qwen3-32b": [("q", 8192, 5120), ("k|v", 1024, 5120), ("o", 5120, 8192),
                  ("gate|up", 25600, 5120), ("down", 5120, 25600)],
}
FUSED = {"qwen3-8b": [("qkv", 6144, 4096), ("gate_up", 24576, 4096)],
         "qwen3-32b": [("qkv", 10240, 5120), ("gate_up", 51200, 5120)]}
DRY_SHAPES = {"tiny": [("a", 256, 384), ("b", 200, 300)]}
DECODE_ROWS, PREFILL_ROWS = (1, 16, 64, 256), (2048, 8192)
GRAPH_MAX_ROWS = 256
ROTATION_BYTES = 512 * 2**20
WRONG = 1e-2  # rel above this: the variant is wrong, never recommended


def timer(dry_run: bool):
    """``time(fn, arg_sets, rows) -> us per call``: CUDA graph over the arg sets (decode rows),
    do_bench on the first (prefill rows), the wall clock on the CPU."""
    def time_us(fn, arg_sets, rows: int) -> float:
        if dry_run:
            start = time.perf_counter()
            fn(*arg_sets[0])
            return (time.perf_counter() - start) * 1e6
        if rows > GRAPH_MAX_ROWS:
            return triton.testing.do_bench(lambda: fn(*arg_sets[0]), warmup=5, rep=40,
                                           return_mode="median") * 1e3
        for args in arg_sets[:2]:
            fn(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for args in arg_sets:
                fn(*args)
        graph.replay()
        torch.cuda.synchronize()
        replays = max(3, min(20, int(2e4 / max(1, len(arg_sets)))))
        return graph_ms(graph, replays) / len(arg_sets) * 1e3
    return time_us


def copy_gb_s(device: str) -> float:
    if device != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    return 2 * 2**30 / ms / 1e6


def scaled_mm_status(device: str) -> str:
    """"ok", or why ``torch._scaled_mm`` cannot run the 128x128 block recipe here."""
    if device != "cuda":
        return "no CUDA"
    try:
        x = torch.randn(4, 512, device=device, dtype=torch.bfloat16)
        wq, ws = fp8.quantize_weight(torch.randn(128, 512, device=device))
        xq, xs = Q.quantize(x, scales_column_major=True)
        G.launch_scaled_mm(xq, xs, wq, ws, torch.bfloat16)
        torch.cuda.synchronize()
        return "ok"
    except Exception as err:  # noqa: BLE001  (reported, not fatal)
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out[: want.shape[0]].float(), want.float()
    return ((out - want).norm() / want.norm()).item()


class Shape:
    """Weights of one projection (bf16 and fp8, rotated past the L2) and the reference."""

    def __init__(self, n: int, k: int, device: str, dry_run: bool):
        self.n, self.k = n, k
        gen = torch.Generator(device=device).manual_seed(n * 7 + k)
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        self.w_q, self.w_s = fp8.quantize_weight(w)
        self.w_deq = fp8.dequantize_weight(self.w_q, self.w_s)
        self.w_bf16 = w.bfloat16()
        copies = 1 if dry_run else max(2, math.ceil(ROTATION_BYTES / (n * k)))
        self.fp8_sets = [(self.w_q, self.w_s)] + [(self.w_q.clone(), self.w_s.clone())
                                                  for _ in range(copies - 1)]
        copies = 1 if dry_run else max(2, math.ceil(ROTATION_BYTES / (2 * n * k)))
        self.bf16_sets = [self.w_bf16] + [self.w_bf16.clone() for _ in range(copies - 1)]
        self.fp8_bytes = n * k + self.w_s.numel() * 4
        self.bf16_bytes = 2 * n * k

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 reference, bf16 reference) on x's first 128 rows, in fp32."""
        x = x[:128]
        xq, xs = fp8.quantize_activation(x)
        fp8_ref = fp8.dequantize_activation(xq, xs) @ self.w_deq.T
        return fp8_ref, x.float() @ self.w_bf16.float().T


def variants(shape: Shape, rows: int, x: torch.Tensor, scaled_mm_ok: bool):
    """(name, fn, arg sets, weight bytes, is fp8) of every variant that applies to ``rows``."""
    xq, xs = Q.quantize(x)
    xs_col = xs.t().contiguous().t()
    out = []
    bf16_sets = [(x, w) for w in shape.bf16_sets]
    out.append(("bf16", lambda x, w: torch.matmul(x, w.T), bf16_sets, shape.bf16_bytes, False))
    config = dmm.config_for(rows, shape.n, shape.k)
    if config is not None and x.is_cuda:
        out.append(("decode_mm", lambda x, w, c=config: dmm.launch(x, w, c), bf16_sets,
                    shape.bf16_bytes, False))
    sets = [(x, w, s) for w, s in shape.fp8_sets]
    qsets = [(xq, xs, w, s) for w, s in shape.fp8_sets]
    out.append(("fp8", lambda x, w, s: torch.ops.adp.fp8_block_linear(x, w, s), sets,
                shape.fp8_bytes, True))
    backends = []
    if rows <= G.DECODE_MAX_ROWS:
        backends.append(G.Choice("decode"))
        # on x in bf16 only: on quantized x it is the plain decode kernel
        in_kernel = G.Choice("decode", G.DecodeConfig(quantize_x_in_kernel=True))
        out.append(("fp8-decode-in-kernel", lambda x, w, s, c=in_kernel: G.linear_2d(
            x, w, s, torch.bfloat16, choice=c), sets, shape.fp8_bytes, True))
    if rows >= 16:
        backends.append(G.Choice("triton", G.default_choice(max(rows, 65)).config))
    if scaled_mm_ok and G.scaled_mm_fits(shape.n, shape.k):
        backends.append(G.Choice("scaled_mm"))
    for choice in backends:
        name = f"fp8-{choice.backend}"
        out.append((name, lambda x, w, s, c=choice: G.linear_2d(x, w, s, torch.bfloat16, choice=c),
                    sets, shape.fp8_bytes, True))
        q_scale = xs_col if choice.backend == "scaled_mm" else xs
        out.append((name + ":q", lambda xq, xs, w, s, c=choice: G.linear_2d(
            xq, w, s, torch.bfloat16, x_scale=xs, choice=c),
            [(xq, q_scale, w, s) for _, _, w, s in qsets], shape.fp8_bytes, True))
    return out


def measure(args, time_us, copy_bw: float, scaled_mm_ok: bool) -> list[dict]:
    device = "cpu" if args.dry_run else "cuda"
    rows_list = [int(r) for r in args.rows.split(",")]
    shapes = DRY_SHAPES if args.dry_run else {
        m: SHAPES[m] + (FUSED[m] if args.fused else []) for m in args.models.split(",")}
    results = []
    for model, entries in shapes.items():
        for name, n, k in entries:
            shape = Shape(n, k, device, args.dry_run)
            for rows in rows_list:
                x = torch.randn(rows, k, device=device, generator=torch.Generator(
                    device=device).manual_seed(rows)).bfloat16()
                fp8_ref, bf16_ref = shape.reference(x)
                for variant, fn, arg_sets, nbytes, is_fp8 in variants(shape, rows, x, scaled_mm_ok):
                    try:
                        err = rel_err(fn(*arg_sets[0]), fp8_ref if is_fp8 else bf16_ref)
                        us = time_us(fn, arg_sets, rows)
                    except Exception as exc:  # noqa: BLE001  (one variant failing is a row)
                        print(f"  {model} {name} rows={rows} {variant}: FAILED {exc}", flush=True)
                        results.append({"model": model, "shape": name, "n": n, "k": k,
                                        "rows": rows, "variant": variant, "error": str(exc)[:300]})
                        continue
                    gb_s = nbytes / us / 1e3
                    row = {"model": model, "shape": name, "n": n, "k": k, "rows": rows,
                           "variant": variant, "us": round(us, 2), "weight_gb_s": round(gb_s, 1),
                           "of_copy": round(gb_s / copy_bw, 3) if copy_bw == copy_bw else None,
                           "tflops": round(2 * rows * n * k / us / 1e6, 1), "rel": err,
                           "wrong": err > WRONG}
                    results.append(row)
                    print(f"  {model:9s} {name:8s} rows={rows:<5d} {variant:16s} {us:9.1f} us "
                          f"{gb_s:7.0f} GB/s {row['tflops']:7.1f} TFLOP/s rel {err:.2e}"
                          f"{'  WRONG' if row['wrong'] else ''}", flush=True)
            del shape
            if device == "cuda":
                torch.cuda.empty_cache()
    return results


# The shapes the runtime's FP8 decode runs (q|k|v and gate|up fused, as fuse_projections leaves
# them): the decode kernel's table is tuned on these.
RUNTIME_SHAPES = [("qwen3-8b qkv", 6144, 4096), ("qwen3-8b o", 4096, 4096),
                  ("qwen3-8b gate_up", 24576, 4096), ("qwen3-8b down", 4096, 12288),
                  ("qwen3-32b qkv", 10240, 5120), ("qwen3-32b o", 5120, 8192),
                  ("qwen3-32b gate_up", 51200, 5120), ("qwen3-32b down", 5120, 25600)]


def decode_sweep(args, time_us, scaled_mm_ok: bool) -> list[dict]:
    """The decode kernel's configurations on the runtime's shapes, on x already quantized (the
    runtime quantizes a bf16 x by one launch first), beside cuBLAS block-scaled on the same x:
    per (shape, rows) the fastest correct one."""
    device = "cpu" if args.dry_run else "cuda"
    shapes = [("tiny", 256, 384)] if args.dry_run else RUNTIME_SHAPES
    grid = [G.DecodeConfig(block_n=b, split_k=s, num_stages=st, num_warps=w)
            for b, st, s, w in itertools.product(args.sweep_block_n, args.sweep_stages,
                                                 args.sweep_splits, args.sweep_warps)]
    if args.dry_run:
        grid = grid[:3]
    rows_list = (3,) if args.dry_run else args.sweep_rows  # the row buckets of TUNED it fills
    out = []
    for label, n, k in shapes:
        shape = Shape(n, k, device, args.dry_run)
        for rows in rows_list:
            x = torch.randn(rows, k, device=device).bfloat16()
            xq, xs = Q.quantize(x)
            fp8_ref, _ = shape.reference(x)
            sets = [(xq, xs, w, s) for w, s in shape.fp8_sets]
            timed = []
            for config in grid + [None]:  # None: the shipped default
                cfg = config or G.DecodeConfig()
                fn = (lambda xq, xs, w, s, c=cfg: G.launch_decode(xq, w, s, c, torch.bfloat16,
                                                                  x_scale=xs))
                try:
                    err = rel_err(fn(*sets[0]), fp8_ref)
                    us = time_us(fn, sets, rows)
                except Exception as exc:  # noqa: BLE001  (an over-budget config)
                    print(f"  sweep {label} rows={rows} {cfg}: FAILED {str(exc)[:120]}")
                    continue
                timed.append((us, config, err))
            cublas_us = float("nan")
            if scaled_mm_ok and G.scaled_mm_fits(n, k):
                xs_col = xs.t().contiguous().t()
                fn = (lambda xq, xs, w, s: G.launch_scaled_mm(xq, xs, w, s, torch.bfloat16))
                if rel_err(fn(xq, xs_col, *shape.fp8_sets[0]), fp8_ref) <= WRONG:
                    cublas_us = time_us(fn, [(xq, xs_col, w, s) for w, s in shape.fp8_sets], rows)
            timed.sort(key=lambda t: t[0])
            default_us = next((us for us, c, _ in timed if c is None), float("nan"))
            best = next((t for t in timed if t[2] <= WRONG), None)
            if best is None:
                print(f"  sweep {label} rows={rows}: no correct configuration")
                continue
            row = {"shape": label, "n": n, "k": k, "rows": rows, "default_us": round(default_us, 2),
                   "best_us": round(best[0], 2), "best": vars(best[1] or G.DecodeConfig()),
                   "best_gb_s": round(shape.fp8_bytes / best[0] / 1e3, 1),
                   "scaled_mm_us": round(cublas_us, 2),
                   "top5": [{"us": round(us, 2), "rel": e, **vars(c or G.DecodeConfig())}
                            for us, c, e in timed[:5]]}
            out.append(row)
            print(f"  sweep {label:18s} rows={rows:<3d} default {default_us:8.1f} us | best "
                  f"{best[0]:8.1f} us {row['best_gb_s']:6.0f} GB/s {row['best']} | cuBLAS "
                  f"{cublas_us:8.1f} us", flush=True)
        del shape
    return out


def decode_table(sweep: list[dict]) -> dict[str, str]:
    """The sweep as ``fp8_gemm.TUNED`` entries: per (N, K) and rows bucket the faster of the best
    decode configuration and cuBLAS."""
    table = {}
    for r in sweep:
        if not math.isnan(r["scaled_mm_us"]) and r["scaled_mm_us"] < r["best_us"]:
            entry = 'Choice("scaled_mm")'
        else:
            b = r["best"]
            warps = f', num_warps={b["num_warps"]}' if b.get("num_warps", 4) != 4 else ""
            entry = (f'Choice("decode", DecodeConfig(block_n={b["block_n"]}, '
                     f'split_k={b["split_k"]}, num_stages={b["num_stages"]}{warps}))')
        table[f"({r['n']}, {r['k']}) rows {r['rows']}"] = entry
    return table


def prefill_sweep(args, time_us) -> list[dict]:
    device = "cpu" if args.dry_run else "cuda"
    shapes = [("tiny", 256, 384)] if args.dry_run else [
        ("qwen3-8b gate|up", 12288, 4096), ("qwen3-32b o", 5120, 8192)]
    grid = [G.PrefillConfig(64, 128, 8, 3, 4), G.PrefillConfig(128, 128, 8, 3, 8),
            G.PrefillConfig(128, 128, 8, 4, 8), G.PrefillConfig(128, 256, 8, 3, 8),
            G.PrefillConfig(128, 128, 8, 4, 4)]
    if args.dry_run:
        grid = [G.PrefillConfig(16, 64, 2, 2, 4)]
    out = []
    for label, n, k in shapes:
        shape = Shape(n, k, device, args.dry_run)
        for rows in ((17,) if args.dry_run else PREFILL_ROWS):
            x = torch.randn(rows, k, device=device).bfloat16()
            xq, xs = Q.quantize(x)
            fp8_ref, _ = shape.reference(x)
            for config in grid:
                fn = (lambda xq, xs, w, s, c=config: G.launch_prefill(xq, xs, w, s, c,
                                                                      torch.bfloat16))
                try:
                    err = rel_err(fn(xq, xs, shape.w_q, shape.w_s), fp8_ref)
                    us = time_us(fn, [(xq, xs, shape.w_q, shape.w_s)], rows)
                except Exception as exc:  # noqa: BLE001
                    print(f"  sweep {label} rows={rows} {config}: FAILED {str(exc)[:120]}")
                    continue
                tflops = 2 * rows * n * k / us / 1e6
                out.append({"shape": label, "n": n, "k": k, "rows": rows, "config": vars(config),
                            "us": round(us, 2), "tflops": round(tflops, 1), "rel": err})
                print(f"  sweep {label:18s} rows={rows:<5d} {config} {us:9.1f} us "
                      f"{tflops:6.1f} TFLOP/s rel {err:.1e}", flush=True)
        del shape
    return out


def suggest(results: list[dict]) -> dict[str, str]:
    """Per (N, K, rows bucket): the fastest correct forced fp8 backend on x already quantized
    (``:q``: what the runtime's linears get from the fused producers; a bf16 x is quantized by
    one launch first whichever backend runs)."""
    best: dict[tuple[int, int, int], tuple[float, str]] = {}
    for r in results:
        if "us" not in r or r["wrong"] or not re.fullmatch(r"fp8-\w+:q", r["variant"]):
            continue
        key = (r["n"], r["k"], G.bucket(r["rows"]))
        if key not in best or r["us"] < best[key][0]:
            best[key] = (r["us"], r["variant"][4:-2])
    return {f"({n}, {k}) rows<={b}": backend for (n, k, b), (_, backend) in sorted(best.items())}


def table(results: list[dict]) -> str:
    cols = ["bf16", "decode_mm", "fp8", "fp8-decode", "fp8-decode-in-kernel", "fp8-triton",
            "fp8-scaled_mm", "fp8-decode:q", "fp8-triton:q", "fp8-scaled_mm:q"]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in results:
        by_key.setdefault((r["model"], r["shape"], r["n"], r["k"], r["rows"]), {})[r["variant"]] = r
    lines = ["| model | shape | rows | " + " | ".join(f"{c} us" for c in cols) +
             " | fp8 GB/s (% copy) | fp8 TFLOP/s | bf16 / fp8 |",
             "|---|---|---:|" + "---:|" * (len(cols) + 3)]
    for (model, name, _, _, rows), found in by_key.items():
        cells = []
        for c in cols:
            r = found.get(c)
            cells.append("-" if r is None else "FAIL" if "us" not in r else
                         f"{r['us']:.1f}{'!' if r['wrong'] else ''}")
        op, base = found.get("fp8", {}), found.get("bf16", {})
        share = f" ({100 * op['of_copy']:.0f}%)" if op.get("of_copy") else ""
        speed = f"{base['us'] / op['us']:.2f}x" if "us" in op and "us" in base else "-"
        lines.append(f"| {model} | {name} | {rows} | " + " | ".join(cells) +
                     f" | {op.get('weight_gb_s', '-')}{share} | {op.get('tflops', '-')} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="qwen3-8b,qwen3-32b")
    parser.add_argument("--rows", default=None, help="comma-separated; default 1,16,64,256,2048,8192")
    parser.add_argument("--fused", action="store_true", help="also the fused qkv and gate_up shapes")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--sweep-only", action="store_true",
                        help="the tuning sweeps alone (no table of every backend)")
    ints = lambda text: tuple(int(v) for v in text.split(",") if v)  # noqa: E731
    parser.add_argument("--sweep-rows", type=ints, default=(16, 64),
                        help="the decode sweep's row counts (TUNED's buckets)")
    parser.add_argument("--sweep-block-n", type=ints, default=(32, 64, 128))
    parser.add_argument("--sweep-stages", type=ints, default=(3, 5))
    parser.add_argument("--sweep-splits", type=ints, default=(0, 1, 2, 4, 8))
    parser.add_argument("--sweep-warps", type=ints, default=(4,),
                        help="e.g. 4,8: two warpgroups share a 128-row weight tile's MMAs")
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke test, tiny shapes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.rows = args.rows or ("1,3,17" if args.dry_run else
                              ",".join(map(str, DECODE_ROWS + PREFILL_ROWS)))
    started = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_fp8_gemm: no CUDA device (use --dry-run for the CPU smoke test)")
    from adp_pass.calibrate import versions

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu-interpreter"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = args.out or (Path(tempfile.gettempdir()) / "fp8-gemm-dry-run.json" if args.dry_run else
                       Path(os.environ.get("OUT") or Path(__file__).parent / "results")
                       / f"fp8-gemm-{slug}.json")
    copy_bw = copy_gb_s(device)
    status = scaled_mm_status(device)
    print(f"{gpu}: copy {copy_bw:.0f} GB/s; torch._scaled_mm 128x128 blocks: {status}", flush=True)
    time_us = timer(args.dry_run)
    result = {"gpu": gpu, "versions": versions(), "command": " ".join(sys.argv),
              "capability": list(torch.cuda.get_device_capability(0)) if device == "cuda" else None,
              "copy_gb_s": copy_bw, "scaled_mm": status, "graph_max_rows": GRAPH_MAX_ROWS,
              "rotation_bytes": ROTATION_BYTES}
    result["rows"] = [] if args.sweep_only else measure(args, time_us, copy_bw, status == "ok")
    result["suggested_tuned"] = suggest(result["rows"])
    write_result(out, result)  # a run cut short keeps the main table
    if args.sweep:
        result["decode_sweep"] = decode_sweep(args, time_us, status == "ok")
        result["decode_tuned"] = decode_table(result["decode_sweep"])
        write_result(out, result)
        if not args.sweep_only:
            result["prefill_sweep"] = prefill_sweep(args, time_us)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_result(out, result)
    print("\nfastest correct fp8 backend per (N, K, rows bucket), for fp8_gemm.TUNED:")
    for key, backend in result["suggested_tuned"].items():
        print(f"  {key}: {backend}")
    for key, entry in result.get("decode_tuned", {}).items():
        print(f"  decode {key}: {entry}")
    print(f"\n{table(result['rows'])}\n(us per call; '!' = rel error above {WRONG}; copy "
          f"{copy_bw:.0f} GB/s; {result['seconds']} s)")


if __name__ == "__main__":
    main()
