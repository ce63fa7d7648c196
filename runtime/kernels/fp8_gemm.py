"""The kernels of ``adp::fp8_block_linear`` (the op itself, its fake and its reference are
``adp_pass.fp8``'s; this module registers the GPU / interpreted implementation over them) and
the op ``adp::fp8_block_linear_quantized``: ``y = x @ W.T`` with ``W`` stored as Qwen3-FP8 / DeepSeek store
it (float8_e4m3fn, one fp32/bf16/fp16 ``weight_scale_inv`` per 128 x 128 tile) and ``x``
quantized per token and 128-wide group on the fly: ``adp_pass.fp8.fp8_linear_reference``.

Three backends, picked per (rows bucket, N, K) by ``choose`` from ``TUNED`` (defaults below):

* ``decode`` (rows <= ``DECODE_MAX_ROWS``): a stream over the weight, as ``adp.decode_mm``,
  operands swapped (``y.T = W @ x.T``) so the weight rows fill the MMA's M side. FP8 halves the
  bytes that decide its time. A high-precision ``x`` is quantized first by
  ``adp.fp8_quant_groups`` (one small launch); the kernel can also quantize the ``x`` rows it
  needs itself (``DecodeConfig.quantize_x_in_kernel``), but every program then repeats the
  amax and the IEEE divisions of the whole tile: on an H100 that made a 4096 x 4096 projection
  at 64 rows 43.6 us against 12.6 us on pre-quantized ``x`` (bench/results/fp8-gemm-h100.json);
* ``triton`` (prefill): x quantized by ``adp.fp8_quant_groups``, then a tiled W8A8 GEMM;
* ``scaled_mm``: x quantized (scales column-major), then ``torch._scaled_mm`` with cuBLAS's
  DeepSeek recipe (1x128 activation and 128x128 weight block scales; sm_90 with cuBLAS >= 12.9,
  torch >= 2.9). Only where the table says so, and only for N % 128 == 0 and K % 512 == 0
  (cuBLAS wants 16-byte aligned scale strides). Row-wise or tensor-wise ``_scaled_mm`` cannot
  express 128 x 128 tile scales, so it is not offered.

Numerics (both Triton kernels): K is walked in 128-wide tiles, one activation group and one
weight tile column each; ``acc += dot(x_fp8, w_fp8) * (x_scale[row] * w_scale[tile])`` with a
fresh fp32 dot per tile (e4m3 products are exact; on sm_90 the fp8 MMA adds them with ~14 bits
of alignment inside the tile, then the partial is promoted to the fp32 accumulator, as DeepSeek
does), one rounding to the output dtype at the end. The reference instead dequantizes both
operands to fp32 and multiplies: same products, other summation order and rounding points, so
results agree to fp32 summation error plus one output ulp (docs/fp8.md, "Kernels").

Partial tiles are handled: N and K need not be multiples of 128 (loads are masked; the scale
grid is ``ceil``). The interpreter runs the fp8 dots exactly (it widens e4m3 to fp16).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from adp_pass import fp8

from .decode_mm import _split_k_sum_kernel
from .fp8_quant import EXACT_BITS, GROUP, E4M3, quantize, quantize_tile
from .utils import as_rows, eager_on_cpu, launch_guard, pdl, previous_kernel_done, round_to

SCALE_DTYPES = fp8.SCALE_DTYPES
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DECODE_MAX_ROWS = 64
# Rows are tuned in buckets, as adp.decode_mm's: bucket b covers the counts above the previous
# bucket up to b; above the last, the last.
ROW_BUCKETS = (1, 16, 64, 256, 2048, 8192)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # weight rows per program (the MMA's M side)
    split_k: int = 0  # programs along K; 0: enough to give every SM two programs
    num_stages: int = 4
    num_warps: int = 4
    # A high-precision x quantized by each program itself rather than by one fp8_quant_groups
    # launch first: one launch less, but measured 2-4x slower (module docstring).
    quantize_x_in_kernel: bool = False


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 128
    block_n: int = 128
    group_m: int = 8  # output tiles walked in groups of block rows, for L2 reuse of W
    num_stages: int = 3
    num_warps: int = 8


@dataclass(frozen=True)
class Choice:
    backend: str  # "decode", "triton" or "scaled_mm"
    config: DecodeConfig | PrefillConfig | None = None


# (N, K) -> {rows bucket: Choice}, from bench/bench_fp8_gemm.py --sweep-only on the target GPU
# (the runtime's fused shapes, x already quantized, CUDA graphs): the entries whose best beat the
# defaults below by more than 3%. H100, torch 2.11, Triton 3.6 (bench/results/
# fp8-gemm-sweep-h100.json), us default -> tuned: Qwen3-8B q|k|v at 16 rows 11.7 -> 11.2,
# o_proj at 64 12.2 -> 10.5, down_proj at 64 28.6 -> 24.1; Qwen3-32B gate|up at 16 101.4 -> 93.9,
# o_proj at 64 24.3 -> 22.4, down_proj at 64 66.0 -> 59.1. Every other shape and bucket: the
# default was the fastest or within 3% (cuBLAS for the wide N at 64 rows).
_D = DecodeConfig
TUNED: dict[tuple[int, int], dict[int, Choice]] = {
    (6144, 4096): {16: Choice("decode", _D(block_n=64, split_k=4, num_stages=3))},
    (4096, 4096): {64: Choice("decode", _D(block_n=128, split_k=4, num_stages=5))},
    (4096, 12288): {64: Choice("decode", _D(block_n=128, split_k=4, num_stages=5))},
    (51200, 5120): {16: Choice("decode", _D(block_n=128, split_k=0, num_stages=5))},
    (5120, 8192): {64: Choice("decode", _D(block_n=64, split_k=0, num_stages=3))},
    (5120, 25600): {64: Choice("decode", _D(block_n=128, split_k=4, num_stages=3))},
}
# The decode kernel up to 16 rows on every shape measured, and up to 64 rows below this N; cuBLAS
# block-scaled beyond (on pre-quantized x, H100, torch 2.11: at 64 rows N 4096 decode 12.6 us vs
# cuBLAS 14.2, N 5120 25.1 vs 24.9, N 8192 24.0 vs 20.1, N 12288 28.1 vs 22.3; at 256 rows and
# above cuBLAS 1.8-3x faster than the Triton tiles on every shape; bench/results/fp8-gemm-h100.json).
DECODE_MAX_N_AT_64_ROWS = 5120


def default_choice(rows: int, n: int = 0, k: int = 0,
                   device: torch.device | None = None) -> Choice:
    """Where cuBLAS's block-scaled path is there (``scaled_mm_available``) and takes the shape:
    decode up to 16 rows (and up to 64 at N <= ``DECODE_MAX_N_AT_64_ROWS``), cuBLAS above. Else
    decode up to ``DECODE_MAX_ROWS`` rows and the Triton tiles above."""
    cublas = _cublas_takes(n, k, device)
    if rows <= 16 or (rows <= DECODE_MAX_ROWS and (not cublas or n <= DECODE_MAX_N_AT_64_ROWS)):
        return Choice("decode", DecodeConfig())
    if cublas:
        return Choice("scaled_mm")
    return Choice("triton", PrefillConfig(block_m=64) if rows <= 256 else PrefillConfig())


def bucket(rows: int) -> int:
    return next((b for b in ROW_BUCKETS if rows <= b), ROW_BUCKETS[-1])


def choose(rows: int, n: int, k: int, device: torch.device | None = None) -> Choice:
    """The backend for ``rows`` x ``(n, k)`` on ``device``: the table's entry, else
    ``default_choice``; an entry the shape or device cannot take falls back to the default."""
    choice = TUNED.get((n, k), {}).get(bucket(rows))
    if (choice is None or (choice.backend == "scaled_mm" and not _cublas_takes(n, k, device))
            or (choice.backend == "decode" and rows > DECODE_MAX_ROWS)):
        return default_choice(rows, n, k, device)
    return choice


def scaled_mm_fits(n: int, k: int) -> bool:
    return n % 128 == 0 and k % 512 == 0


def _cublas_takes(n: int, k: int, device: torch.device | None) -> bool:
    return device is not None and scaled_mm_fits(n, k) and scaled_mm_available(device)


_SCALED_MM: dict[int, bool] = {}


def scaled_mm_available(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` takes the DeepSeek block scales on ``device``: sm_90 (Hopper's
    cuBLAS recipe; other GPUs get the Triton kernels), then one tiny call, its answer kept per
    device. During a CUDA graph capture a device not asked yet counts as without (no probe may
    run inside a capture); ``prepare_rank`` asks for an FP8 rank's device first."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SCALED_MM:
        if torch.cuda.get_device_capability(index) != (9, 0):
            _SCALED_MM[index] = False
        elif torch.cuda.is_current_stream_capturing():
            return False
        else:
            _SCALED_MM[index] = _probe_scaled_mm(torch.device("cuda", index))
    return _SCALED_MM[index]


def _probe_scaled_mm(device: torch.device) -> bool:
    x = torch.zeros(4, 512, device=device).to(E4M3)
    w = torch.zeros(128, 512, device=device).to(E4M3)
    x_scale = torch.ones(4, 4, device=device).t().contiguous().t()  # column-major [M, K/128]
    w_scale = torch.ones(1, 4, device=device)
    try:
        torch._scaled_mm(x, w.t(), x_scale, w_scale.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _rounded(acc, dtype: tl.constexpr):
    # Round to nearest even on the bits: the interpreter's cast truncates.
    return round_to(acc, dtype).to(dtype)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    as_ptr,
    w_ptr,
    ws_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_asg,
    stride_wn,
    stride_wsn,
    stride_wsk,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Prefill: ``out[M, N] = a_fp8[M, K] @ w_fp8[N, K].T`` with per-(row, group) and per-tile
    scales. One program per output tile, tiles ordered in GROUP_M bands of rows so the weight
    tiles a band reads stay in L2."""
    previous_kernel_done(PDL)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)
    first_m = band * GROUP_M
    band_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % band_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // band_rows
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the edge read row 0's / column 0's data (valid memory, no mask on the
    # hot loads); they are never stored.
    rows = tl.where(offs_m < M, offs_m, 0)
    cols = tl.where(offs_n < N, offs_n, 0)
    a_rows = a_ptr + rows[:, None] * stride_am
    w_cols = w_ptr + cols[None, :] * stride_wn
    a_scales = as_ptr + rows * stride_asm
    ws_cols = ws_ptr + (cols // 128) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in tl.range(0, tl.cdiv(K, 128), num_stages=NUM_STAGES):
        offs_k = kt * 128 + tl.arange(0, 128)
        if EVEN_K:
            a = tl.load(a_rows + offs_k[None, :])
            w = tl.load(w_cols + offs_k[:, None])
        else:
            a = tl.load(a_rows + offs_k[None, :], mask=offs_k[None, :] < K, other=0.0)
            w = tl.load(w_cols + offs_k[:, None], mask=offs_k[:, None] < K, other=0.0)
        a_scale = tl.load(a_scales + kt * stride_asg)
        w_scale = tl.load(ws_cols + kt * stride_wsk).to(tl.float32)
        acc += tl.dot(a, w) * (a_scale[:, None] * w_scale[None, :])
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, _rounded(acc, out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# tiles_per_split varies with the split count: one compiled kernel for all of them.
@triton.jit(do_not_specialize=["tiles_per_split"])
def _fp8_decode_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    out_ptr,
    partial_ptr,
    M,
    N,
    K,
    tiles_per_split,
    stride_xm,
    stride_xsm,
    stride_xsg,
    stride_wn,
    stride_wsn,
    stride_wsk,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QUANT_X: tl.constexpr,
    SPLIT: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    EXACT_BITS: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Decode: ``out.T[N, M] = w_fp8[N, K] @ x_fp8[M, K].T`` for BLOCK_N weight rows and all
    M <= BLOCK_M rows, over this program's range of 128-wide K tiles. With QUANT_X, ``x`` is
    bf16/fp16/fp32 and each tile is quantized here (``fp8_quant.quantize_tile``, the same bits
    as ``adp.fp8_quant_groups``); else ``x`` is fp8 with its scales."""
    previous_kernel_done(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, 128))
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    ws_rows = ws_ptr + (offs_n // 128) * stride_wsn
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in tl.range(first, last, num_stages=NUM_STAGES):
        offs_k = kt * 128 + tl.arange(0, 128)
        k_mask = offs_k < K
        # The weight is read once: do not let it push x (read by every program) out of L2.
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        w_scale = tl.load(ws_rows + kt * stride_wsk, mask=n_mask, other=0.0).to(tl.float32)
        xt = tl.load(x_cols + offs_k[:, None], mask=m_mask[None, :] & k_mask[:, None], other=0.0)
        if QUANT_X:
            xt, x_scale = quantize_tile(xt.to(tl.float32), 0, EXACT_BITS)
        else:
            x_scale = tl.load(xs_ptr + offs_m * stride_xsm + kt * stride_xsg, mask=m_mask, other=0.0)
        acc += tl.dot(w, xt) * (w_scale[:, None] * x_scale[None, :])
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT:
        part = partial_ptr + (pid_k * M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None]
        tl.store(part, acc, mask=mask)
    else:
        out = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        tl.store(out, _rounded(acc, out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------- launchers
def _output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every tensor a launch writes (the tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_for(config: DecodeConfig, n: int, k: int, device: torch.device) -> int:
    """``config.split_k``, or for 0: enough splits for two programs per SM, each keeping at least
    four K tiles (its pipeline's depth); 1 off the GPU."""
    k_tiles = math.ceil(k / GROUP)
    if config.split_k:
        return max(1, min(config.split_k, k_tiles))
    if device.type != "cuda":
        return 1
    programs = math.ceil(n / config.block_n)
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(math.ceil(target / programs), k_tiles // 4))


def launch_decode(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  config: DecodeConfig, out_dtype: torch.dtype,
                  x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The decode kernel on 2-D ``x`` [M, K], M small (unit column stride): bf16/fp16/fp32, or fp8
    with ``x_scale`` [M, ceil(K/128)]."""
    rows, k = x.shape
    n = weight.shape[0]
    out = _output((rows, n), out_dtype, x.device)
    if rows == 0:
        return out
    split = split_for(config, n, k, x.device)
    per_split = math.ceil(math.ceil(k / GROUP) / split)
    split = math.ceil(math.ceil(k / GROUP) / per_split)  # no program without a tile
    partial = _output((split, rows, n), torch.float32, x.device) if split > 1 else out
    quant_x = x_scale is None
    xs = x if quant_x else x_scale
    with launch_guard(_fp8_decode_kernel, x, weight, weight_scale):
        _fp8_decode_kernel[(triton.cdiv(n, config.block_n), split)](
            x, xs, weight, weight_scale, out, partial, rows, n, k, per_split, x.stride(0),
            0 if quant_x else xs.stride(0), 0 if quant_x else xs.stride(1), weight.stride(0),
            weight_scale.stride(0), weight_scale.stride(1), out.stride(0),
            BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=config.block_n,
            QUANT_X=quant_x, SPLIT=split > 1, NUM_STAGES=config.num_stages,
            EXACT_BITS=EXACT_BITS, num_warps=config.num_warps, num_stages=config.num_stages,
            **pdl(x))
        if split > 1:
            block = 1024
            _split_k_sum_kernel[(triton.cdiv(rows * n, block),)](
                partial, out, rows, n, out.stride(0), SPLIT_K=split, BLOCK=block, num_warps=4,
                **pdl(x))
    return out


def launch_prefill(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                   weight_scale: torch.Tensor, config: PrefillConfig, out_dtype: torch.dtype
                   ) -> torch.Tensor:
    """The tiled kernel on quantized 2-D ``x_fp8`` [M, K] and its scales [M, ceil(K/128)]."""
    rows, k = x_fp8.shape
    n = weight.shape[0]
    out = _output((rows, n), out_dtype, x_fp8.device)
    if rows == 0:
        return out
    grid = (triton.cdiv(rows, config.block_m) * triton.cdiv(n, config.block_n),)
    with launch_guard(_fp8_gemm_kernel, x_fp8, x_scale, weight, weight_scale):
        _fp8_gemm_kernel[grid](
            x_fp8, x_scale, weight, weight_scale, out, rows, n, k, x_fp8.stride(0),
            x_scale.stride(0), x_scale.stride(1), weight.stride(0), weight_scale.stride(0),
            weight_scale.stride(1), out.stride(0), BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, GROUP_M=config.group_m, EVEN_K=k % GROUP == 0,
            NUM_STAGES=config.num_stages, num_warps=config.num_warps,
            num_stages=config.num_stages, **pdl(x_fp8))
    return out


def launch_scaled_mm(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                     weight_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLAS's block-scaled FP8 GEMM (``torch._scaled_mm``, DeepSeek recipe). ``x_scale`` must be
    column-major ([M, G] with strides (1, M): ``quantize(..., scales_column_major=True)``); M is
    padded to a multiple of 4 (the scales' 16-byte stride), the padding sliced off."""
    rows = x_fp8.shape[0]
    pad = -rows % 4
    if pad:
        x_fp8 = torch.nn.functional.pad(x_fp8.view(torch.uint8), (0, 0, 0, pad)).view(E4M3)
        x_scale = torch.nn.functional.pad(x_scale.t(), (0, pad), value=1.0).t()
    w_scale = weight_scale.to(torch.float32).contiguous()
    out = torch._scaled_mm(x_fp8, weight.t(), x_scale, w_scale.t(), out_dtype=out_dtype)
    return out[:rows] if pad else out


def linear_2d(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              out_dtype: torch.dtype, x_scale: torch.Tensor | None = None,
              choice: Choice | None = None) -> torch.Tensor:
    """``x @ W.T`` for 2-D ``x`` (high precision, or fp8 with ``x_scale``) by ``choice``
    (default: ``choose``)."""
    rows, k = x.shape
    choice = choice or choose(rows, weight.shape[0], k, x.device)
    if choice.backend == "decode":
        config = choice.config or DecodeConfig()
        if x_scale is None and not config.quantize_x_in_kernel:
            x, x_scale = quantize(x)
        return launch_decode(x, weight, weight_scale, config, out_dtype, x_scale)
    column_major = choice.backend == "scaled_mm"
    if x_scale is None:
        x, x_scale = quantize(x, scales_column_major=column_major)
    elif column_major:
        x_scale = x_scale.t().contiguous().t()
    if column_major:
        return launch_scaled_mm(x, x_scale, weight, weight_scale, out_dtype)
    return launch_prefill(x, x_scale, weight, weight_scale, choice.config or PrefillConfig(),
                          out_dtype)


# ---------------------------------------------------------------------------------------- ops
# The op's schema, fake and reference implementation are adp_pass.fp8's (capture and rewrite
# need no runtime module); this module registers the kernels over it. Both devices: on a CPU-only
# machine Triton interprets, and the CPU tests run these kernels through the op.
check_weight = fp8.check_weight
fp8_block_linear = fp8.fp8_block_linear


@fp8_block_linear.register_kernel(("cuda", "cpu"))
def _fp8_block_linear_kernel(x: torch.Tensor, weight: torch.Tensor,
                             weight_scale_inv: torch.Tensor) -> torch.Tensor:
    fp8.check_linear(x, weight, weight_scale_inv)
    if eager_on_cpu(_fp8_gemm_kernel, x, weight, weight_scale_inv):
        return fp8.fp8_linear_reference(x, weight, weight_scale_inv)
    x2 = as_rows(x)
    out = linear_2d(x2, weight, weight_scale_inv, x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


def _check_quantized(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                     weight_scale_inv: torch.Tensor, out_dtype: torch.dtype) -> None:
    op = "fp8_block_linear_quantized"
    if x_fp8.dim() == 0 or x_fp8.dtype != E4M3:
        raise ValueError(f"{op}: x_fp8 must be float8_e4m3fn [..., K], got {x_fp8.dtype} "
                         f"{tuple(x_fp8.shape)}")
    groups = math.ceil(x_fp8.shape[-1] / GROUP)
    if tuple(x_scale.shape) != (*x_fp8.shape[:-1], groups) or x_scale.dtype != torch.float32:
        raise ValueError(f"{op}: x_scale must be float32 {[*x_fp8.shape[:-1], groups]} (one per "
                         f"row and 128-wide group), got {x_scale.dtype} {list(x_scale.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    check_weight(op, weight, weight_scale_inv, x_fp8.shape[-1])
    if not (x_fp8.device == x_scale.device == weight.device):
        raise ValueError(f"{op}: x_fp8, x_scale and weight must share a device")


def reference_quantized(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                        weight_scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The eager product of pre-quantized operands (``fp8_linear_reference`` after its
    quantization step)."""
    activation = fp8.dequantize_activation(x_fp8, x_scale)
    return (activation @ fp8.dequantize_weight(weight, weight_scale_inv).T).to(out_dtype)


@torch.library.custom_op("adp::fp8_block_linear_quantized", mutates_args=())
def fp8_block_linear_quantized(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                               weight_scale_inv: torch.Tensor, out_dtype: torch.dtype
                               ) -> torch.Tensor:
    """``fp8_block_linear`` on an activation already quantized (``adp.fp8_quant_groups``, or a
    fused producer such as ``adp.rms_norm_fp8``); result ``[..., N]`` in ``out_dtype``."""
    _check_quantized(x_fp8, x_scale, weight, weight_scale_inv, out_dtype)
    if eager_on_cpu(_fp8_gemm_kernel, x_fp8, weight, weight_scale_inv):
        return reference_quantized(x_fp8, x_scale, weight, weight_scale_inv, out_dtype)
    x2 = as_rows(x_fp8)
    s2 = x_scale.reshape(-1, x_scale.shape[-1])
    out = linear_2d(x2, weight, weight_scale_inv, out_dtype, x_scale=s2)
    return out.view(*x_fp8.shape[:-1], weight.shape[0])


@fp8_block_linear_quantized.register_fake
def _(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
      weight_scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _check_quantized(x_fp8, x_scale, weight, weight_scale_inv, out_dtype)
    return torch.empty((*x_fp8.shape[:-1], weight.shape[0]), dtype=out_dtype, device=x_fp8.device)
