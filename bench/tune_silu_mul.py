"""Tile size, warps and division for the silu_mul kernel, against torch.compile (CUDA graphs).

    python3 bench/tune_silu_mul.py --out bench/results/tune-silu-mul-<gpu>.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from gpu_timing import median_ms
from results_file import versions

# The production kernel's arithmetic: the variants below differ in tiling only.
from adp_pass.runtime.kernels.silu_mul import silu_times

INTERMEDIATE = 12288  # Qwen3-8B


@triton.jit
def _variant_kernel(gate_ptr, up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr, IEEE_DIV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if IEEE_DIV:
        act = tl.div_rn(g, 1.0 + tl.exp(-g))
    else:
        act = g / (1.0 + tl.exp(-g))
    act = act.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_kernel(gate_ptr, up_ptr, out_ptr, n_rows, n_cols, BLOCK: tl.constexpr,
                 ROWS: tl.constexpr, EVICT: tl.constexpr):
    """ROWS rows per program (more bytes in flight per program at prefill sizes)."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    if EVICT:
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        u = tl.load(up_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, silu_times(g.to(tl.float32), u.to(tl.float32),
                                        out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flat_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """One flat index over contiguous tensors, as Inductor's pointwise kernels do."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, silu_times(g, u, out_ptr.dtype.element_ty), mask=mask)


def run_rows(gate, up, out, block, warps, rows, evict):
    grid = (triton.cdiv(gate.shape[0], rows), triton.cdiv(gate.shape[1], block))
    _rows_kernel[grid](gate, up, out, gate.shape[0], gate.shape[1], BLOCK=block, ROWS=rows,
                       EVICT=evict, num_warps=warps)


def run_flat(gate, up, out, block, warps):
    n = gate.numel()
    _flat_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=warps)


def large(rows: list, sizes: tuple[int, ...] = (4096, 16384)) -> None:
    """Prefill sizes (4096 and 16384 tokens), where compile led by 4%: rows per program,
    eviction hints and a flat index."""
    compiled = torch.compile(reference)
    for tokens in sizes:
        gate = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
        up = torch.randn_like(gate)
        want = reference(gate, up)
        compiled(gate, up)
        base = median_ms(lambda: compiled(gate, up)) * 1e3
        variants = [("rows", (b, w, r, e)) for b in (1024, 2048, 4096) for w in (4, 8)
                    for r in (1, 2, 4) for e in (False, True) if b * r <= 8192]
        variants += [("flat", (b, w)) for b in (1024, 2048, 4096) for w in (4, 8)]
        for kind, params in variants:
            out = torch.empty_like(gate)
            fn = (lambda: run_rows(gate, up, out, *params)) if kind == "rows" else (
                lambda: run_flat(gate, up, out, *params))
            fn()
            exact = (out.view(torch.int16) == want.view(torch.int16)).float().mean().item()
            us = median_ms(fn) * 1e3
            rows.append({"tokens": tokens, "kind": kind, "params": params, "us": us,
                         "compile_us": base, "exact_fraction": exact})
            print(f"T={tokens:<6} {kind} {params}: {us:8.2f} us (compile {base:8.2f}, "
                  f"{base / us:.3f}x) exact {exact:.4f}", flush=True)


def run_variant(gate, up, out, block, warps, ieee):
    grid = (gate.shape[0], triton.cdiv(gate.shape[1], block))
    _variant_kernel[grid](gate, up, out, gate.shape[1], BLOCK=block, IEEE_DIV=ieee, num_warps=warps)


def reference(gate, up):
    return torch.nn.functional.silu(gate) * up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--large", action="store_true",
                        help="only the prefill sizes, with the row/flat variants")
    parser.add_argument("--large-tokens", default="4096,16384",
                        help="token counts for --large (e.g. 512,1024,2048 to place the switch "
                             "to the flat kernel)")
    args = parser.parse_args()
    compiled = torch.compile(reference)
    rows = []
    for tokens in () if args.large else (1, 16, 64, 512, 4096, 16384):
        gate = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
        up = torch.randn_like(gate)
        want = reference(gate, up)
        compiled(gate, up)
        base = median_ms(lambda: compiled(gate, up)) * 1e3
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (512, 4)):
            for ieee in (True, False):
                out = torch.empty_like(gate)
                run_variant(gate, up, out, block, warps, ieee)
                exact = (out.view(torch.int16) == want.view(torch.int16)).float().mean().item()
                us = median_ms(lambda: run_variant(gate, up, out, block, warps, ieee)) * 1e3
                rows.append({"tokens": tokens, "block": block, "warps": warps, "ieee_div": ieee,
                             "us": us, "compile_us": base, "exact_fraction": exact})
                print(f"T={tokens:<6} block {block:<5} warps {warps} ieee {int(ieee)}: "
                      f"{us:8.2f} us (compile {base:8.2f}, {base / us:.2f}x) exact {exact:.4f}",
                      flush=True)
    if args.large:
        large(rows, tuple(int(t) for t in args.large_tokens.split(",")))
    if args.out:
        meta = {"gpu": torch.cuda.get_device_name(), "versions": versions()}
        json.dump({"metadata": meta, "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
