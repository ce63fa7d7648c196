"""FP8 activation quantization: ``adp::fp8_quant_groups`` and the fused producers
``adp::rms_norm_fp8``, ``adp::add_rms_norm_fp8`` and ``adp::silu_mul_fp8``.

Each computes ``adp_pass.fp8.quantize_activation`` bit for bit: per token and per 128-wide group
of the last dim, ``scale = max(amax, 1e-12) / 448`` in fp32, ``q = e4m3(clamp(x / scale, -448,
448))`` with round-to-nearest-even, a partial last group counting as one. The fused ops quantize
what the unfused op would have written (the normed or SwiGLU value rounded to the model dtype),
so ``rms_norm_fp8(x) == quantize_activation(rms_norm(x))`` exactly: the activation never goes
through memory in bf16, which is the point (one read of the input, one byte per element out).

Numerics, and why each step is written as it is:

* both divisions are ``div_rn`` (IEEE), as torch's fp32 ``/``; Triton's default ``/`` is an
  approximate division on the GPU, which would move scales and codes by an ulp;
* the fp32 -> e4m3 cast: compiled, Triton's cast (``cvt.rn.satfinite.e4m3x2.f32`` on sm_89+:
  round to nearest even, as torch's cast); interpreted, the code is computed on the bits
  (``e4m3_bits``), because the interpreter's own fp32 -> fp8 conversion is wrong (Triton 3.9: it
  rounds ties away from even, drops the carry of a rounded-up mantissa, e.g. 31.1 -> 16, and
  mangles subnormals). Upcasts from fp8 and fp8 dots are exact in the interpreter;
* NaN inputs are not reproduced (``tl.maximum`` may drop a NaN that torch's ``amax`` keeps).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from adp_pass import fp8

from . import reference
from .rms_norm import _rms_norm_row, check_norm_weight
from .utils import as_rows, eager_on_cpu, launch_guard, pdl, previous_kernel_done, round_to

GROUP = fp8.ACTIVATION_GROUP  # 128: the kernels hard-code one group per 128 columns
E4M3 = fp8.E4M3
MIN_AMAX = 1e-12  # adp_pass.fp8's floor on a group's amax (an all-zero group)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def e4m3_bits(y):
    """uint8 e4m3fn code of fp32 ``y`` in [-448, 448], rounded to nearest even on the bits."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 31) << 7
    mag = bits & 0x7FFFFFFF
    a = mag.to(tl.float32, bitcast=True)
    # Normal range [2^-6, 448]: keep 3 mantissa bits (half an ulp plus the tie bit, as
    # utils.round_to does for bf16); a carry moves into the exponent. Rebias 127 -> 7.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    # Below 2^-6 the step is 2^-9: a * 2^9 (exact) rounded to an integer, ties to even, by
    # adding and removing 2^23. Code 8 (2^-6) is also the smallest normal, so the seam is exact.
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    return (tl.where(a < 0.015625, sub, normal) | sign).to(tl.uint8)


@triton.jit
def to_e4m3(y, EXACT_BITS: tl.constexpr):
    if EXACT_BITS:
        return e4m3_bits(y).to(tl.float8e4nv, bitcast=True)
    else:
        return y.to(tl.float8e4nv)


@triton.jit
def quantize_tile(x, AXIS: tl.constexpr, EXACT_BITS: tl.constexpr):
    """fp32 ``x`` 2-D with one 128-wide group along ``AXIS`` (masked lanes 0) -> (e4m3 codes,
    fp32 scales along the other axis): ``adp_pass.fp8.quantize_activation`` per group."""
    amax = tl.max(tl.abs(x), axis=AXIS)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    if AXIS == 1:
        q = tl.math.div_rn(x, scale[:, None])
    else:
        q = tl.math.div_rn(x, scale[None, :])
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    return to_e4m3(q, EXACT_BITS), scale


@triton.jit
def _store_row_groups(y, q_row_ptr, s_row_ptr, col0, n_cols, BLOCK: tl.constexpr,
                      EXACT_BITS: tl.constexpr):
    """Quantize the fp32 row piece ``y`` = columns ``col0 .. col0 + BLOCK`` of a row (``col0``
    and BLOCK multiples of 128; lanes past ``n_cols`` 0); store its codes and group scales."""
    GROUPS: tl.constexpr = BLOCK // 128
    q, scale = quantize_tile(tl.reshape(y, (GROUPS, 128)), 1, EXACT_BITS)
    cols = col0 + tl.arange(0, BLOCK)
    tl.store(q_row_ptr + cols, tl.reshape(q, (BLOCK,)), mask=cols < n_cols)
    groups = col0 // 128 + tl.arange(0, GROUPS)
    tl.store(s_row_ptr + groups, scale, mask=groups * 128 < n_cols)


@triton.jit
def _quant_groups_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    rows,
    n_cols,
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sg,
    BLOCK_R: tl.constexpr,
    EXACT_BITS: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    cols = group * 128 + tl.arange(0, 128)
    mask = (offs_r < rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + offs_r[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    q, scale = quantize_tile(x.to(tl.float32), 1, EXACT_BITS)
    tl.store(q_ptr + offs_r[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + offs_r * stride_sm + group * stride_sg, scale, mask=offs_r < rows)


@triton.jit
def _rms_norm_fp8_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    q_ptr,
    s_ptr,
    res_out_ptr,
    x_row_stride,
    res_row_stride,
    q_row_stride,
    s_row_stride,
    res_out_row_stride,
    n_cols,
    eps,
    NORMED_DTYPE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    EXACT_BITS: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # As adp.add_rms_norm: the sum is rounded to the model dtype, stored, then normed.
        r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * res_out_row_stride + cols, s, mask=mask)
        x = s.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # The value adp.rms_norm would store, rounded on the bits (a cast round trip can be folded).
    y = round_to(_rms_norm_row(x, w, n_cols, eps, x_ptr.dtype.element_ty), NORMED_DTYPE)
    _store_row_groups(y, q_ptr + row * q_row_stride, s_ptr + row * s_row_stride, 0, n_cols,
                      BLOCK, EXACT_BITS)


@triton.jit
def _silu_mul_fp8_kernel(
    gate_ptr,
    up_ptr,
    q_ptr,
    s_ptr,
    gate_row_stride,
    up_row_stride,
    q_row_stride,
    s_row_stride,
    n_cols,
    BLOCK: tl.constexpr,
    EXACT_BITS: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK
    cols = col0 + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = gate_ptr.dtype.element_ty
    # silu_mul.silu_times' formula and both roundings, kept in fp32 for the quantization.
    h = round_to(round_to(g / (1.0 + tl.exp(-g)), dtype) * u, dtype)
    _store_row_groups(h, q_ptr + row * q_row_stride, s_ptr + row * s_row_stride, col0, n_cols,
                      BLOCK, EXACT_BITS)


# The interpreter's fp32 -> fp8 cast is wrong (module docstring): compute codes on the bits there.
EXACT_BITS = isinstance(_quant_groups_kernel, InterpretedFunction)


def _output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every tensor a launch writes (the tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_quantized(shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    groups = math.ceil(shape[-1] / GROUP)
    return (_output(tuple(shape), E4M3, device),
            _output((*shape[:-1], groups), torch.float32, device))


def _check_activation(op: str, x: torch.Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op} needs x [..., K] with K >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{op}: x must be bfloat16, float16 or float32, got {x.dtype}")


def quantize(x: torch.Tensor, scales_column_major: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scales)`` of 2-D ``x`` [M, K] (unit column stride). ``scales_column_major``:
    the scales [M, G] are a view with strides (1, M), the layout ``torch._scaled_mm``'s
    1x128 block scaling reads."""
    rows, n_cols = x.shape
    groups = math.ceil(n_cols / GROUP)
    q = _output((rows, n_cols), E4M3, x.device)
    if scales_column_major:
        scales = _output((groups, rows), torch.float32, x.device).t()
    else:
        scales = _output((rows, groups), torch.float32, x.device)
    if rows == 0:
        return q, scales
    block_r = min(16, triton.next_power_of_2(rows))
    with launch_guard(_quant_groups_kernel, x):
        _quant_groups_kernel[(triton.cdiv(rows, block_r), groups)](
            x, q, scales, rows, n_cols, x.stride(0), q.stride(0), scales.stride(0),
            scales.stride(1), BLOCK_R=block_r, EXACT_BITS=EXACT_BITS, num_warps=4, **pdl(x))
    return q, scales


@torch.library.custom_op("adp::fp8_quant_groups", mutates_args=())
def fp8_quant_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``adp_pass.fp8.quantize_activation(x)``: ``(x_fp8 [..., K], scales [..., ceil(K/128)]
    float32)``, both new and contiguous; rows of ``x`` may be strided."""
    _check_activation("fp8_quant_groups", x)
    if eager_on_cpu(_quant_groups_kernel, x):
        q, scales = fp8.quantize_activation(x)
        return q.contiguous(), scales.contiguous()
    x2 = as_rows(x)
    q, scales = quantize(x2)
    return q.view(x.shape), scales.view(*x.shape[:-1], scales.shape[-1])


@fp8_quant_groups.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_activation("fp8_quant_groups", x)
    return _empty_quantized(x.shape, x.device)


def _row_block(n_cols: int) -> tuple[int, int]:
    """A whole row per program, padded to a power of two of at least one group; warps as
    utils.block_and_warps would give the bf16 row."""
    block = max(GROUP, triton.next_power_of_2(n_cols))
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def _norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    q, scales = _empty_quantized(x.shape, x.device)
    res_out = _output(tuple(x.shape), x.dtype, x.device) if residual is not None else None
    if x.numel() == 0:
        return q, scales, res_out
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else x2
    ro2 = res_out.view(-1, x.shape[-1]) if res_out is not None else x2
    q2, s2 = q.view(-1, x.shape[-1]), scales.view(-1, scales.shape[-1])
    block, num_warps = _row_block(x2.shape[1])
    normed_dtype = torch.promote_types(x.dtype, weight.dtype)
    with launch_guard(_rms_norm_fp8_kernel, x, weight, r2):
        _rms_norm_fp8_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), q2, s2, ro2, x2.stride(0), r2.stride(0), q2.stride(0),
            s2.stride(0), ro2.stride(0), x2.shape[1], eps,
            NORMED_DTYPE=_TL_DTYPES[normed_dtype], HAS_RESIDUAL=residual is not None,
            BLOCK=block, EXACT_BITS=EXACT_BITS, num_warps=num_warps, **pdl(x))
    return q, scales, res_out


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@torch.library.custom_op("adp::rms_norm_fp8", mutates_args=())
def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activation(rms_norm(x, weight, eps))`` in one kernel (the normed activation
    in ``promote(x, weight)`` is quantized, never stored)."""
    _check_activation("rms_norm_fp8", x)
    check_norm_weight(x, weight)
    if eager_on_cpu(_rms_norm_fp8_kernel, x, weight):
        q, scales = fp8.quantize_activation(reference.rms_norm(x, weight, eps))
        return q.contiguous(), scales.contiguous()
    q, scales, _ = _norm_fp8(x, None, weight, eps)
    return q, scales


@rms_norm_fp8.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_activation("rms_norm_fp8", x)
    check_norm_weight(x, weight)
    return _empty_quantized(x.shape, x.device)


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"x {tuple(x.shape)}/{x.dtype} and residual {tuple(residual.shape)}/"
                         f"{residual.dtype} must match in shape and dtype")


@torch.library.custom_op("adp::add_rms_norm_fp8", mutates_args=())
def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``adp.add_rms_norm`` with the normed output quantized: ``(x_fp8, scales, x + residual)``."""
    _check_activation("add_rms_norm_fp8", x)
    _check_residual(x, residual)
    check_norm_weight(x, weight)
    if eager_on_cpu(_rms_norm_fp8_kernel, x, residual, weight):
        normed, new_residual = reference.add_rms_norm(x, residual, weight, eps)
        q, scales = fp8.quantize_activation(normed)
        return q.contiguous(), scales.contiguous(), new_residual.contiguous()
    q, scales, res_out = _norm_fp8(x, residual, weight, eps)
    return q, scales, res_out


@add_rms_norm_fp8.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_activation("add_rms_norm_fp8", x)
    _check_residual(x, residual)
    check_norm_weight(x, weight)
    return (*_empty_quantized(x.shape, x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device))


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul_fp8: gate {tuple(gate.shape)}/{gate.dtype} and up "
                         f"{tuple(up.shape)}/{up.dtype} must match in shape and dtype")


# Columns per program of silu_mul_fp8: whole groups, 512 as silu_mul's decode tiles.
_SILU_TILE = 512


@torch.library.custom_op("adp::silu_mul_fp8", mutates_args=())
def silu_mul_fp8(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activation(silu_mul(gate, up))`` in one kernel; ``gate``/``up`` may be the two
    column halves of a fused gate|up output."""
    _check_activation("silu_mul_fp8", gate)
    _check_pair(gate, up)
    if eager_on_cpu(_silu_mul_fp8_kernel, gate, up):
        q, scales = fp8.quantize_activation(reference.silu_mul(gate, up))
        return q.contiguous(), scales.contiguous()
    q, scales = _empty_quantized(gate.shape, gate.device)
    if gate.numel() == 0:
        return q, scales
    g2, u2 = as_rows(gate), as_rows(up)
    q2, s2 = q.view(-1, gate.shape[-1]), scales.view(-1, scales.shape[-1])
    n_rows, n_cols = g2.shape
    block = min(_SILU_TILE, max(GROUP, triton.next_power_of_2(n_cols)))
    with launch_guard(_silu_mul_fp8_kernel, gate, up):
        _silu_mul_fp8_kernel[(n_rows, triton.cdiv(n_cols, block))](
            g2, u2, q2, s2, g2.stride(0), u2.stride(0), q2.stride(0), s2.stride(0), n_cols,
            BLOCK=block, EXACT_BITS=EXACT_BITS, num_warps=4, **pdl(gate))
    return q, scales


@silu_mul_fp8.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_activation("silu_mul_fp8", gate)
    _check_pair(gate, up)
    return _empty_quantized(gate.shape, gate.device)
