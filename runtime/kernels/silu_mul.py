"""``adp::silu_mul`` and ``adp::silu_mul_fused``: the SwiGLU activation of Qwen3MLP.

transformers computes ``act_fn(gate_proj(x)) * up_proj(x)``: aten ``silu`` evaluates
``g / (1 + exp(-g))`` in fp32 and rounds to the model dtype, then the product with ``up`` is
rounded again. The kernel rounds at the same two points, so bf16 results match eager up to rare
1-ulp differences from the ``exp`` approximation.
"""

import torch
import triton
import triton.language as tl

from . import reference
from .utils import as_rows, block_and_warps, eager_on_cpu, launch_guard, pdl, previous_kernel_done, round_to

# Elementwise tile: 1024 elements = 8 per thread at 4 warps (16-byte bf16 vectors).
_TILE = 1024
_DECODE_TILE = 512
# 65-1023 rows: 2048-element tiles at 4 warps (16 per thread); from 1024 rows on, the flat-index
# kernel. Against torch.compile on the H200 (bench/results/tune-silu-mul-small-h200.json):
# 0.998x at 512 rows (0.959x with 1024-element tiles), 1.005x at 1024, 1.002x at 2048.
_MID_TILE = 2048
_FLAT_ROWS = 1024


@triton.jit
def silu_times(g, u, dtype: tl.constexpr):
    """``silu(g) * u`` in ``dtype`` from fp32 ``g``, ``u``: aten's silu formula, rounded to the
    model dtype before the multiply as ``act_fn(gate)`` is. Triton's default (approximate) fp32
    division: bit-identical to eager after the bf16 rounding on H200 and 10% faster at decode
    sizes than IEEE div_rn (bench/tune_silu_mul.py, bench/results/tune-silu-mul-h200.json)."""
    return (round_to(g / (1.0 + tl.exp(-g)), dtype) * u).to(dtype)


@triton.jit
def _silu_mul_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    gate_row_stride,
    up_row_stride,
    out_row_stride,
    n_cols,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, silu_times(g, u, out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _silu_mul_flat_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    gate_row_stride,
    up_row_stride,
    n_elements,
    N_COLS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    # One flat index over the (contiguous) output, as Inductor's pointwise kernels do: at
    # prefill sizes this reads at copy speed where a program per (row, tile) fell 4% short
    # (bench/results/tune-silu-mul-large-h200.json). N_COLS is a constant so // and % are cheap.
    previous_kernel_done(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    row = offs // N_COLS
    col = offs % N_COLS
    g = tl.load(gate_ptr + row * gate_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, silu_times(g, u, out_ptr.dtype.element_ty), mask=mask)


def _launch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Shared host path; ``gate``/``up`` may be views (e.g. the two halves of ``gate_up``)."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    g2, u2, out2 = as_rows(gate), as_rows(up), out.view(-1, gate.shape[-1])
    n_rows, n_cols = g2.shape
    if n_rows >= _FLAT_ROWS:
        with launch_guard(_silu_mul_flat_kernel, gate, up):
            _silu_mul_flat_kernel[(triton.cdiv(out.numel(), _TILE),)](
                g2, u2, out2, g2.stride(0), u2.stride(0), out.numel(), N_COLS=n_cols,
                BLOCK=_TILE, num_warps=4, **pdl(gate))
        return out
    if n_rows <= 64:  # decode: smaller tiles put more programs on the SMs
        block, num_warps = block_and_warps(n_cols, max_block=_DECODE_TILE)
    else:
        block = min(_MID_TILE, triton.next_power_of_2(n_cols))
        num_warps = 4
    grid = (n_rows, triton.cdiv(n_cols, block))
    with launch_guard(_silu_mul_kernel, gate, up):
        _silu_mul_kernel[grid](
            g2,
            u2,
            out2,
            g2.stride(0),
            u2.stride(0),
            out2.stride(0),
            n_cols,
            BLOCK=block,
            num_warps=num_warps,
            **pdl(gate),
        )
    return out


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"gate {tuple(gate.shape)}/{gate.dtype} and up {tuple(up.shape)}/{up.dtype} "
            "must match in shape and dtype"
        )


def _check_fused(gate_up: torch.Tensor) -> int:
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up last dim must be even, got shape {tuple(gate_up.shape)}")
    return gate_up.shape[-1] // 2


@torch.library.custom_op("adp::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` elementwise, with transformers' rounding order."""
    _check_pair(gate, up)
    if eager_on_cpu(_silu_mul_kernel, gate, up):
        return reference.silu_mul(gate, up).contiguous()
    return _launch(gate, up)


@silu_mul.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_pair(gate, up)
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("adp::silu_mul_fused", mutates_args=())
def silu_mul_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` with ``I = gate_up.shape[-1] // 2``."""
    half = _check_fused(gate_up)
    if eager_on_cpu(_silu_mul_kernel, gate_up):
        return reference.silu_mul_fused(gate_up).contiguous()
    return _launch(gate_up[..., :half], gate_up[..., half:])


@silu_mul_fused.register_fake
def _(gate_up: torch.Tensor) -> torch.Tensor:
    half = _check_fused(gate_up)
    return torch.empty((*gate_up.shape[:-1], half), dtype=gate_up.dtype, device=gate_up.device)
