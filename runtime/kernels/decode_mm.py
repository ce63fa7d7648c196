"""``adp::decode_mm``: ``x @ W.T`` for a few rows of ``x``, as a stream over the weight.

At decode batch sizes (``M <= 64`` rows) a projection reads its whole weight to multiply it by
a thin ``x``: the GEMM is a memory copy with a little arithmetic. cuBLAS picks tiles made for
square problems there and reads Qwen3-8B's o_proj at 2.9 TB/s and down_proj at 3.5 TB/s on the
H200, against 4.2 TB/s for a plain copy (bench/results/profile-decode-*.json).

The kernel swaps the operands (``out.T = W @ x.T``, the "swap AB" trick of TensorRT-LLM's and
vLLM's small-M GEMMs): the weight's rows fill the MMA's M side (64 or 128) and the batch,
padded to 16/32/64, its N side, so no MMA lane multiplies padding. The reduction dimension can
be split over ``SPLIT_K`` programs to put more loads in flight when ``N / BLOCK_N`` alone does
not fill the SMs; the fp32 partial sums are then added by a second kernel in a fixed order, so
results do not depend on scheduling.

Shapes that were not tuned, strided operands, and more than ``MAX_ROWS`` rows go to
``torch.mm``: the op is a drop-in for ``mm(x, t(W))`` (``runtime/lower/decode_mm.py``).
Configurations per GPU and shape come from ``bench/tune_decode_mm.py``.

Numerics: fp32 accumulation, one rounding to the output dtype, like cuBLAS; the summation order
differs, so results match ``torch.mm`` to fp32 rounding of the sum, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from triton.runtime.interpreter import InterpretedFunction

from .utils import launch_guard, pdl, previous_kernel_done, round_to

# Row counts are tuned in buckets: bucket b covers the counts above the previous bucket up to
# b. Above the last the GEMM is no longer a weight stream; cuBLAS's tiles are right.
ROW_BUCKETS = (16, 32, 64)
MAX_ROWS = ROW_BUCKETS[-1]


@dataclass(frozen=True)
class DecodeMMConfig:
    block_n: int  # weight rows per program (the MMA's M side)
    block_k: int
    split_k: int
    num_stages: int
    num_warps: int = 4


@triton.jit
def _rounded(acc, dtype: tl.constexpr):
    # Round to nearest even on the bits: the interpreter's cast truncates.
    return round_to(acc, dtype).to(dtype)


@triton.jit
def _decode_mm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    partial_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, k_tiles)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for tile in tl.range(first, last, num_stages=NUM_STAGES):
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # The weight is read once: do not let it push x (read by every program) out of L2.
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        xt = tl.load(x_cols + offs_k[:, None], mask=m_mask[None, :] & k_mask[:, None], other=0.0)
        if DOT_IN_FP32:
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(w, xt, acc)
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        out = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        tl.store(out, _rounded(acc, out_ptr.dtype.element_ty), mask=mask)
    else:
        part = partial_ptr + (pid_k * M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None]
        tl.store(part, acc, mask=mask)


@triton.jit
def _split_k_sum_kernel(partial_ptr, out_ptr, M, N, stride_om, SPLIT_K: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    previous_kernel_done(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # a fixed order: the same sum on every call
        acc += tl.load(partial_ptr + s * M * N + offs, mask=mask, other=0.0)
    row = offs // N
    tl.store(out_ptr + row * stride_om + offs % N, _rounded(acc, out_ptr.dtype.element_ty),
             mask=mask)


# Triton's interpreter multiplies bf16 dot operands as raw bits; it gets fp32 copies (exact).
_INTERPRETED = isinstance(_decode_mm_kernel, InterpretedFunction)


def block_m(rows: int) -> int:
    """The batch side of the MMA: tl.dot needs at least 16."""
    return max(16, triton.next_power_of_2(rows))


def launch(x: torch.Tensor, weight: torch.Tensor, config: DecodeMMConfig) -> torch.Tensor:
    """``x @ weight.T`` with ``config``; ``x`` [M, K] and ``weight`` [N, K] with unit inner
    stride, ``M <= MAX_ROWS``."""
    rows = x.shape[0]
    n, k = weight.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    split = config.split_k
    partial = (torch.empty((split, rows, n), dtype=torch.float32, device=x.device)
               if split > 1 else out)
    grid = (triton.cdiv(n, config.block_n), split)
    with launch_guard(_decode_mm_kernel, x, weight):
        _decode_mm_kernel[grid](
            x, weight, out, partial, rows, n, k, x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_M=block_m(rows), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            SPLIT_K=split, NUM_STAGES=config.num_stages, DOT_IN_FP32=_INTERPRETED,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl(x),
        )
        if split > 1:
            block = 1024
            _split_k_sum_kernel[(triton.cdiv(rows * n, block),)](
                partial, out, rows, n, out.stride(0), SPLIT_K=split, BLOCK=block, num_warps=4, **pdl(x))
    return out


# Tuned on one H200 (torch 2.11, Triton 3.6) by bench/tune_decode_mm.py:
# (N, K) -> {rows bucket: config}. A shape or bucket absent here runs on cuBLAS, which won,
# tied or led by less than 3% there.
# At 64 rows cuBLAS is as fast or faster for Qwen3-8B's shapes (bench/results/
# tune-decode-mm-h200.json, -swiglu-h200.json for down_proj); the gains are at 16-32 rows
# (3-12%) and Qwen3-32B's o_proj (15%).
_C = DecodeMMConfig
TUNED: dict[tuple[int, int], dict[int, DecodeMMConfig]] = {
    # Qwen3-8B: q|k|v, o_proj, LM head
    (6144, 4096): {16: _C(64, 256, 1, 4), 32: _C(64, 128, 1, 6)},
    (4096, 4096): {16: _C(64, 256, 1, 4), 32: _C(64, 128, 1, 6)},
    (151936, 4096): {16: _C(64, 128, 1, 3), 32: _C(128, 128, 1, 4)},
    # Qwen3-32B: q|k|v, o_proj, gate|up, down_proj, LM head
    (10240, 5120): {32: _C(128, 128, 1, 4)},
    (5120, 8192): {16: _C(64, 256, 1, 4), 32: _C(64, 128, 1, 6), 64: _C(64, 128, 1, 6)},
    (51200, 5120): {16: _C(64, 64, 1, 3)},
    (5120, 25600): {16: _C(64, 256, 1, 4), 32: _C(64, 128, 1, 6)},
    (151936, 5120): {16: _C(64, 256, 1, 4)},
}


def config_for(rows: int, n: int, k: int) -> DecodeMMConfig | None:
    """The tuned configuration for ``rows`` x ``(n, k)``, or None (use ``torch.mm``)."""
    bucket = next((b for b in ROW_BUCKETS if rows <= b), None)
    if bucket is None:
        return None
    return TUNED.get((n, k), {}).get(bucket)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"decode_mm needs x [M, K] and weight [N, K]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"decode_mm: x is {x.dtype} but weight is {weight.dtype}")


@torch.library.custom_op("adp::decode_mm", mutates_args=())
def decode_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (``aten.mm(x, aten.t(weight))``); a weight stream for tuned decode
    shapes, ``torch.mm`` otherwise."""
    _check(x, weight)
    config = config_for(x.shape[0], weight.shape[0], weight.shape[1])
    if config is None or x.stride(1) != 1 or weight.stride(1) != 1 or not x.is_cuda:
        return torch.mm(x, weight.t())
    return launch(x, weight, config)


@decode_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    _check(x, weight)
    return x.new_empty((x.shape[0], weight.shape[0]))

