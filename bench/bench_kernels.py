"""Benchmark the adp Triton kernels against eager PyTorch, torch.compile and a D2D copy.

GPU (Qwen3-8B sizes, bf16)::

    python bench/bench_kernels.py [--out bench/results/kernels-<gpu>.json] [--tokens 1 4096]

CPU smoke test (Triton interpreter, tiny shapes, wall-clock timing, eager compile backend)::

    python bench/bench_kernels.py --dry-run [--out /tmp/kernels-dry-run.json]

Bytes moved = bytes of every input element read + every output element written (the cos/sin
table counts only the gathered rows). The copy baseline copies half that many bytes, so it moves
the same total (read + write). Sizes up to --graph-max-tokens are timed inside a CUDA graph
(``do_bench_cudagraph``: launch overhead excluded, data L2-resident), larger ones with
``do_bench`` (L2 flushed between runs). All times are medians.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import torch  # noqa: E402
from gpu_timing import median_ms  # noqa: E402
from results_file import versions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_reference as ref  # noqa: E402

from adp_pass.runtime import kernels  # noqa: E402,F401  (registers torch.ops.adp.*)

KERNELS = ["rms_norm", "add_rms_norm", "silu_mul", "silu_mul_fused", "qk_norm_rope"]
IMPLS = ["triton", "eager", "compile", "copy"]
EPS = 1e-6  # Qwen3 rms_norm_eps


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    n_q: int
    n_kv: int
    head_dim: int
    max_position: int


QWEN3_8B = Dims(hidden=4096, intermediate=12288, n_q=32, n_kv=8, head_dim=128, max_position=40960)
TINY = Dims(hidden=256, intermediate=512, n_q=4, n_kv=2, head_dim=64, max_position=1024)


@dataclass
class Case:
    args: tuple
    ours: Callable
    ref: Callable
    n_bytes: int


def make_case(kernel: str, tokens: int, d: Dims, dtype: torch.dtype, device: str) -> Case:
    """Inputs, our op, the eager reference and the bytes moved for one kernel/size."""
    es = torch.empty((), dtype=dtype).element_size()

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device)

    w = 1 + 0.1 * rand(d.hidden)
    if kernel == "rms_norm":
        return Case((rand(tokens, d.hidden), w, EPS), torch.ops.adp.rms_norm, ref.rms_norm_ref,
                    (2 * tokens * d.hidden + d.hidden) * es)  # fmt: skip
    if kernel == "add_rms_norm":
        args = (rand(tokens, d.hidden), rand(tokens, d.hidden), w, EPS)
        return Case(args, torch.ops.adp.add_rms_norm, ref.add_rms_norm_ref,
                    (4 * tokens * d.hidden + d.hidden) * es)  # fmt: skip
    if kernel == "silu_mul":
        args = (rand(tokens, d.intermediate), rand(tokens, d.intermediate))
        return Case(args, torch.ops.adp.silu_mul, ref.silu_mul_ref, 3 * tokens * d.intermediate * es)
    if kernel == "silu_mul_fused":
        return Case((rand(tokens, 2 * d.intermediate),), torch.ops.adp.silu_mul_fused,
                    ref.silu_mul_fused_ref, 3 * tokens * d.intermediate * es)  # fmt: skip
    assert kernel == "qk_norm_rope", kernel
    # q and k are strided views of a fused qkv projection output, as in the model.
    hd = d.head_dim
    qkv = rand(tokens, (d.n_q + 2 * d.n_kv) * hd)
    q = qkv[:, : d.n_q * hd].view(tokens, d.n_q, hd)
    k = qkv[:, d.n_q * hd : (d.n_q + d.n_kv) * hd].view(tokens, d.n_kv, hd)
    cache = kernels.build_cos_sin_cache(d.max_position, hd, 1e6, dtype, device)
    positions = torch.randint(0, d.max_position, (tokens,), device=device)
    args = (q, k, 1 + 0.1 * rand(hd), 1 + 0.1 * rand(hd), cache, positions, EPS)
    n_bytes = 2 * tokens * (d.n_q + d.n_kv) * hd * es + 2 * hd * es + tokens * (hd * es + 8)
    return Case(args, torch.ops.adp.qk_norm_rope, ref.qk_norm_rope_ref, n_bytes)


def flat(out: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def compare(ours: Callable, reference: Callable, args: tuple) -> tuple[float, float]:
    """(max |ours - eager|, fraction of output elements bit-identical to eager)."""
    got, want = flat(ours(*args)), flat(reference(*args))
    max_err = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
    same = sum((g == w).sum().item() for g, w in zip(got, want))
    return max_err, same / sum(w.numel() for w in want)


def make_timer(args: argparse.Namespace) -> Callable[[Callable, bool], float]:
    """Returns time_ms(fn, use_graph) -> median milliseconds."""

    def time_ms(fn: Callable, use_graph: bool) -> float:
        return median_ms(fn, cudagraph=use_graph, rep=args.rep, warmup=args.warmup,
                         wall=args.dry_run)

    return time_ms


def run(args: argparse.Namespace) -> list[dict]:
    device = "cpu" if args.dry_run else "cuda"
    dims = TINY if args.dry_run else QWEN3_8B
    backend = "eager" if args.dry_run else "inductor"
    time_ms = make_timer(args)
    rows = []
    for kernel in args.kernels:
        compiled = None
        for tokens in args.tokens:
            case = make_case(kernel, tokens, dims, torch.bfloat16, device)
            if compiled is None:
                compiled = torch.compile(case.ref, dynamic=False, backend=backend)
            max_err, exact = compare(case.ours, case.ref, case.args)
            if exact < 0.98 and not args.dry_run:  # the interpreter truncates bf16 casts
                print(f"WARNING {kernel} T={tokens}: only {exact:.4f} bit-identical to eager "
                      f"(max |diff| {max_err:.3g})", file=sys.stderr)  # fmt: skip
            src = torch.empty(case.n_bytes // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            fns = {
                "triton": lambda: case.ours(*case.args),
                "eager": lambda: case.ref(*case.args),
                "compile": lambda: compiled(*case.args),
                "copy": lambda: dst.copy_(src),
            }
            use_graph = tokens <= args.graph_max_tokens
            for impl, fn in fns.items():
                ms = time_ms(fn, use_graph)
                row = {
                    "kernel": kernel,
                    "tokens": tokens,
                    "impl": impl,
                    "ms": ms,
                    "bytes": case.n_bytes,
                    "gbps": case.n_bytes / (ms * 1e6),
                    "timer": "wall" if args.dry_run else ("cudagraph" if use_graph else "do_bench"),
                }
                if impl == "triton":
                    row.update(max_abs_err=max_err, exact_fraction=exact)
                rows.append(row)
                print(f"{kernel:>14} T={tokens:<6} {impl:<8} {ms * 1e3:10.2f} us "
                      f"{row['gbps']:9.1f} GB/s", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def report(rows: list[dict]) -> str:
    """Markdown table plus ratio summaries."""
    by = {(r["kernel"], r["tokens"], r["impl"]): r for r in rows}
    keys = sorted({(r["kernel"], r["tokens"]) for r in rows}, key=lambda k: (KERNELS.index(k[0]), k[1]))
    lines = [
        "| kernel | tokens | MB moved | " + " | ".join(f"{i} us (GB/s)" for i in IMPLS) + " | bit-exact |",
        "|---|---:|---:|" + "---:|" * len(IMPLS) + "---:|",
    ]
    for kernel, tokens in keys:
        cells = [f"{by[kernel, tokens, i]['ms'] * 1e3:.2f} ({by[kernel, tokens, i]['gbps']:.0f})" for i in IMPLS]
        t = by[kernel, tokens, "triton"]
        lines.append(f"| {kernel} | {tokens} | {t['bytes'] / 1e6:.3f} | " + " | ".join(cells)
                     + f" | {t['exact_fraction']:.4f} |")  # fmt: skip
    lines += ["", "Triton GB/s as a fraction of copy GB/s (tokens >= 4096):"]
    for kernel in dict.fromkeys(k for k, _ in keys):
        big = [t for k, t in keys if k == kernel and t >= 4096]
        ratios = [f"T={t}: {by[kernel, t, 'triton']['gbps'] / by[kernel, t, 'copy']['gbps']:.2f}" for t in big]
        lines.append(f"- {kernel}: " + (", ".join(ratios) or "n/a"))
    lines += ["", "Speedup over torch.compile (compile time / Triton time, > 1 = Triton faster):"]
    for kernel in dict.fromkeys(k for k, _ in keys):
        ratios = [f"T={t}: {by[kernel, t, 'compile']['ms'] / by[kernel, t, 'triton']['ms']:.2f}x"
                  for k, t in keys if k == kernel]  # fmt: skip
        lines.append(f"- {kernel}: " + ", ".join(ratios))
    return "\n".join(lines)


def metadata(args: argparse.Namespace, gpu: str) -> dict:
    dims = TINY if args.dry_run else QWEN3_8B
    return {
        "gpu": gpu,
        "versions": versions(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": "bfloat16",
        "dims": dims.__dict__,
        "eps": EPS,
        "graph_max_tokens": args.graph_max_tokens,
        "dry_run": args.dry_run,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter smoke test")
    p.add_argument("--tokens", type=int, nargs="+", help="default 1 16 64 512 4096 16384 (dry run: 1 3)")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS)
    p.add_argument("--graph-max-tokens", type=int, default=64, help="largest size timed in a CUDA graph")
    p.add_argument("--rep", type=int, default=50, help="target ms of timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup ms")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels-<gpu>.json)")
    args = p.parse_args()
    args.tokens = args.tokens or ([1, 3] if args.dry_run else [1, 16, 64, 512, 4096, 16384])
    return args


def main() -> None:
    args = parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --dry-run for the CPU smoke test")
    gpu = "cpu-interpreter" if args.dry_run else torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    default_dir = Path(tempfile.gettempdir()) if args.dry_run else Path(__file__).parent / "results"
    out = args.out or default_dir / f"kernels-{slug}.json"
    rows = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"metadata": metadata(args, gpu), "rows": rows}, indent=1) + "\n")
    print(report(rows))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
