"""``adp::add_rms_norm``: residual add followed by Qwen3RMSNorm, one read of each input.

transformers' decoder layer does ``hidden_states = residual + hidden_states`` in the model dtype
(the sum is rounded to bf16/fp16) and then ``post_attention_layernorm(hidden_states)``; the kernel
rounds the sum the same way, writes it as the new residual and normalises the rounded value.
Functional: inputs are never written.
"""

import torch
import triton
import triton.language as tl

from .rms_norm import _rms_norm_row, check_norm_weight
from . import reference
from .utils import as_rows, block_and_warps, eager_on_cpu, launch_guard, pdl, previous_kernel_done


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    x_row_stride,
    res_row_stride,
    out_row_stride,
    res_out_row_stride,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    # The sum exists in the model dtype in transformers: round it before normalising.
    # (A cast, not utils.round_to: the rounded sum is stored, so the compiler keeps the rounding,
    # and the bit arithmetic cost 16% at 512 rows on the H200.)
    s = (x + r).to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * res_out_row_stride + cols, s, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = _rms_norm_row(s.to(tl.float32), w, n_cols, eps, res_out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(
            f"x {tuple(x.shape)}/{x.dtype} and residual {tuple(residual.shape)}/{residual.dtype} "
            "must match in shape and dtype"
        )
    check_norm_weight(x, weight)


def _empty_outputs(
    x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    normed_dtype = torch.promote_types(x.dtype, weight.dtype)
    normed = torch.empty(x.shape, dtype=normed_dtype, device=x.device)
    return normed, torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("adp::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``; the sum is in ``x.dtype``."""
    _check(x, residual, weight)
    if eager_on_cpu(_add_rms_norm_kernel, x, residual, weight):
        normed, new_residual = reference.add_rms_norm(x, residual, weight, eps)
        return normed.contiguous(), new_residual.contiguous()
    normed, new_residual = _empty_outputs(x, weight)
    if x.numel() == 0:
        return normed, new_residual
    x2, r2 = as_rows(x), as_rows(residual)
    out2, res_out2 = normed.view(-1, x.shape[-1]), new_residual.view(-1, x.shape[-1])
    n_rows, n_cols = x2.shape
    block, num_warps = block_and_warps(n_cols)
    assert n_cols <= block, f"hidden size {n_cols} exceeds the single-block limit {block}"
    with launch_guard(_add_rms_norm_kernel, x, residual, weight):
        _add_rms_norm_kernel[(n_rows,)](
            x2,
            r2,
            weight.contiguous(),
            out2,
            res_out2,
            x2.stride(0),
            r2.stride(0),
            out2.stride(0),
            res_out2.stride(0),
            n_cols,
            eps,
            BLOCK=block,
            num_warps=num_warps,
            **pdl(x),
        )
    return normed, new_residual


@add_rms_norm.register_fake
def _(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, residual, weight)
    return _empty_outputs(x, weight)
