"""Tile size, warps and division for the silu_mul kernel, against torch.compile (CUDA graphs).

    python3 bench/tune_silu_mul.py --out bench/results/tune-silu-mul-<gpu>.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

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


def run_variant(gate, up, out, block, warps, ieee):
    grid = (gate.shape[0], triton.cdiv(gate.shape[1], block))
    _variant_kernel[grid](gate, up, out, gate.shape[1], BLOCK=block, IEEE_DIV=ieee, num_warps=warps)


def reference(gate, up):
    return torch.nn.functional.silu(gate) * up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    compiled = torch.compile(reference)
    rows = []
    for tokens in (1, 16, 64, 512, 4096, 16384):
        gate = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
        up = torch.randn_like(gate)
        want = reference(gate, up)
        compiled(gate, up)
        base = do_bench_cudagraph(lambda: compiled(gate, up)) * 1e3
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (512, 4)):
            for ieee in (True, False):
                out = torch.empty_like(gate)
                run_variant(gate, up, out, block, warps, ieee)
                exact = (out.view(torch.int16) == want.view(torch.int16)).float().mean().item()
                us = do_bench_cudagraph(lambda: run_variant(gate, up, out, block, warps, ieee)) * 1e3
                rows.append({"tokens": tokens, "block": block, "warps": warps, "ieee_div": ieee,
                             "us": us, "compile_us": base, "exact_fraction": exact})
                print(f"T={tokens:<6} block {block:<5} warps {warps} ieee {int(ieee)}: "
                      f"{us:8.2f} us (compile {base:8.2f}, {base / us:.2f}x) exact {exact:.4f}",
                      flush=True)
    if args.out:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__}
        json.dump({"metadata": meta, "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
