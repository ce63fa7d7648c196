"""``adp::greedy_argmax``: the argmax of each row of the logits, as two small Triton kernels.

A decode graph ends with the greedy token of every row, ``argmax`` over a vocabulary of ~152k
logits. With one row per sequence there are few rows and very long ones; the first kernel cuts
each row into ``CHUNK``-wide pieces (rows x chunks programs, so the whole GPU reads the logits),
the second picks each row's winner among its pieces.

Same answer as ``torch.argmax(logits, dim=-1)``: the first index of the largest value, NaN
counting as larger than everything (the first NaN wins). Values compare in fp32, exact for the
16-bit dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import eager_on_cpu, launch_guard, pdl, previous_kernel_done

CHUNK = 4096
_BIG = 2**31 - 1


@triton.jit
def _first_index_of_max(values, index, valid, big: tl.constexpr):
    """(largest value, its first index, 1 if it is a NaN) of ``values`` where ``valid``."""
    nan = (values != values) & valid
    first_nan = tl.min(tl.where(nan, index, big), axis=0)
    keyed = tl.where(valid, values, float("-inf"))
    best = tl.max(tl.where(nan, float("-inf"), keyed), axis=0)
    # A piece of -inf only has best -inf and so its first index; one of NaNs only wins by its
    # first NaN below.
    first_best = tl.min(tl.where(valid & (keyed == best), index, big), axis=0)
    has_nan = first_nan < big
    return (tl.where(has_nan, float("inf"), best), tl.where(has_nan, first_nan, first_best),
            has_nan.to(tl.int32))


@triton.jit
def _chunk_argmax_kernel(logits_ptr, part_val_ptr, part_idx_ptr, part_nan_ptr, row_stride,
                         n_cols, n_chunks, CHUNK: tl.constexpr, BIG: tl.constexpr,
                         PDL: tl.constexpr = 0):
    previous_kernel_done(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = cols < n_cols
    values = tl.load(logits_ptr + row.to(tl.int64) * row_stride + cols, mask=valid,
                     other=float("-inf")).to(tl.float32)
    best, index, has_nan = _first_index_of_max(values, cols, valid, BIG)
    slot = row * n_chunks + chunk
    tl.store(part_val_ptr + slot, best)
    tl.store(part_idx_ptr + slot, index)
    tl.store(part_nan_ptr + slot, has_nan)


@triton.jit
def _row_argmax_kernel(part_val_ptr, part_idx_ptr, part_nan_ptr, out_ptr, n_chunks,
                       CHUNKS_PAD: tl.constexpr, BIG: tl.constexpr, PDL: tl.constexpr = 0):
    previous_kernel_done(PDL)
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_PAD)
    valid = c < n_chunks
    base = row * n_chunks
    best = tl.load(part_val_ptr + base + c, mask=valid, other=float("-inf"))
    index = tl.load(part_idx_ptr + base + c, mask=valid, other=BIG)
    nan = (tl.load(part_nan_ptr + base + c, mask=valid, other=0) != 0) & valid
    # Pieces are in column order, so the smallest index among the winners is the first one.
    first_nan = tl.min(tl.where(nan, index, BIG), axis=0)
    top = tl.max(best, axis=0)  # masked lanes loaded as -inf
    first_top = tl.min(tl.where(valid & (best == top), index, BIG), axis=0)
    tl.store(out_ptr + row, tl.where(first_nan < BIG, first_nan, first_top).to(tl.int64))


@torch.library.custom_op("adp::greedy_argmax", mutates_args=())
def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of ``[R, V]`` logits (int64 ``[R]``)."""
    if logits.dim() != 2:
        raise ValueError(f"greedy_argmax takes [rows, vocab] logits, got {tuple(logits.shape)}")
    rows, n_cols = logits.shape
    if n_cols == 0:
        raise ValueError("greedy_argmax of an empty vocabulary")
    if n_cols >= _BIG:
        raise ValueError(f"vocabulary of {n_cols} columns exceeds int32 indexing")
    if eager_on_cpu(_chunk_argmax_kernel, logits):
        return logits.argmax(dim=-1)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_chunks = triton.cdiv(n_cols, CHUNK)
    part_val = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((rows, n_chunks), dtype=torch.int32, device=logits.device)
    part_nan = torch.empty((rows, n_chunks), dtype=torch.int32, device=logits.device)
    with launch_guard(_chunk_argmax_kernel, logits):
        _chunk_argmax_kernel[(rows, n_chunks)](
            logits, part_val, part_idx, part_nan, logits.stride(0), n_cols, n_chunks,
            CHUNK=CHUNK, BIG=_BIG, num_warps=8, **pdl(logits))
        _row_argmax_kernel[(rows,)](
            part_val, part_idx, part_nan, out, n_chunks,
            CHUNKS_PAD=max(16, triton.next_power_of_2(n_chunks)), BIG=_BIG, num_warps=1,
            **pdl(logits))
    return out


@greedy_argmax.register_fake
def _(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)
