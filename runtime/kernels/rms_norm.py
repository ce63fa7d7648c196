"""``adp::rms_norm``: Qwen3RMSNorm over the last dim as one Triton kernel.

transformers (Qwen3RMSNorm.forward)::

    h = x.to(float32); h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)

so the normalised value is rounded to the input dtype *before* the weight multiply, and the result
dtype is ``promote_types(weight.dtype, x.dtype)``. The kernel reproduces both.
"""

import torch
import triton
import triton.language as tl

from . import reference
from .utils import as_rows, block_and_warps, eager_on_cpu, launch_guard, pdl, previous_kernel_done, round_to


@triton.jit
def _rms_norm_row(x, w, n_cols, eps, IN_DTYPE: tl.constexpr):
    """fp32 row ``x`` (masked lanes 0) -> fp32 ``w * round_IN_DTYPE(x * rstd)``."""
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # Round to the input dtype before the weight multiply, as `hidden_states.to(input_dtype)`.
    return round_to(x * rstd, IN_DTYPE) * w


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    x_row_stride,
    out_row_stride,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can exceed 2**31
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = _rms_norm_row(x, w, n_cols, eps, x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def check_norm_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden {x.shape[-1]}")


@torch.library.custom_op("adp::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim; any leading shape, rows may be strided."""
    check_norm_weight(x, weight)
    if eager_on_cpu(_rms_norm_kernel, x, weight):
        return reference.rms_norm(x, weight, eps).contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if out.numel() == 0:
        return out
    x2, out2 = as_rows(x), out.view(-1, x.shape[-1])
    n_rows, n_cols = x2.shape
    block, num_warps = block_and_warps(n_cols)
    assert n_cols <= block, f"hidden size {n_cols} exceeds the single-block limit {block}"
    with launch_guard(_rms_norm_kernel, x, weight):
        _rms_norm_kernel[(n_rows,)](
            x2,
            weight.contiguous(),
            out2,
            x2.stride(0),
            out2.stride(0),
            n_cols,
            eps,
            BLOCK=block,
            num_warps=num_warps,
            **pdl(x),
        )
    return out


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_norm_weight(x, weight)
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
