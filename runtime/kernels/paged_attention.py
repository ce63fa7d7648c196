"""Paged KV cache write + paged decode attention (GQA) as Triton kernels.

Registered as ``torch.ops.adp.reshape_and_cache`` and
``torch.ops.adp.paged_decode_attention`` on import. Cache layout (vLLM "flash" layout):
``[num_blocks, block_size, num_kv_heads, head_dim]``; see docs/kv_cache.md.
On CPU the kernels only run under ``TRITON_INTERPRET=1``.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# tl.dot needs every dimension >= 16 on GPU, so the q-head group is padded to 16 rows.
_MIN_DOT_DIM = 16
# Split-K heuristic: a split should cover at least this many blocks, else the
# combine pass and partial buffers cost more than the extra parallelism buys.
_MIN_BLOCKS_PER_SPLIT = 8
_MAX_SPLITS = 32
_LOG2E = 1.4426950408889634


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_slot,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok * stride_slot).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM_PAD)[None, :]
    # slot < 0 marks a padding token: it gets zero valid heads, so every lane is masked.
    # (Folded into the head bound because the interpreter mis-types `tensor & scalar_bool`.)
    heads_valid = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (h < heads_valid) & (d < head_dim)
    k = tl.load(key_ptr + tok * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    dst = block * stride_cb + offset * stride_cs + h * stride_ch + d * stride_cd
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb, stride_btn, stride_cl,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    qk_scale_log2, head_dim, max_blocks, blocks_per_split,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)

    ctx = tl.load(context_lens_ptr + seq * stride_cl).to(tl.int64)
    first = split * blocks_per_split
    # Clamp to the table width so a context_len beyond it cannot read out of bounds.
    num_blocks = tl.minimum(tl.cdiv(ctx, BLOCK_SIZE), max_blocks)
    last = tl.minimum(first + blocks_per_split, num_blocks)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    t = tl.arange(0, BLOCK_SIZE)
    g_mask = g < GROUP
    d_mask = d < head_dim
    heads = kvh * GROUP + g  # HF repeat_kv order: kv head i serves q heads i*GROUP ..

    # All dots take fp32 operands: fp16/bf16 values are exact in tf32, P keeps 10
    # mantissa bits instead of 7, and the Triton interpreter multiplies bf16 dot
    # operands as raw uint16 bits. Decode is bandwidth-bound, so the cost is nil.
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    for j in range(first, last):
        phys = tl.load(block_tables_ptr + seq * stride_btb + j * stride_btn).to(tl.int64)
        valid = (j * BLOCK_SIZE + t) < ctx
        kv_off = phys * stride_cb + t[:, None] * stride_cs + kvh * stride_ch + d[None, :] * stride_cd
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        # Every visited block holds >= 1 valid token, so m_new is finite here.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Empty range (context_len 0, or a split past the end): emit zeros, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :] * stride_od
    o_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        tl.store(o_ptrs, out, mask=o_mask)
        # log2-domain log-sum-exp of this split; -inf for an empty split.
        lse = m_i + tl.log2(l_safe)
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _combine_splits_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    num_splits, head_dim,
    SPLITS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    s_mask = s < num_splits
    d_mask = d < head_dim
    lse = tl.load(lse_ptr + seq * stride_lb + head * stride_lh + s * stride_ls, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # All splits empty (context_len 0): avoid -inf - -inf = NaN.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)
    part = tl.load(
        part_ptr + seq * stride_pb + head * stride_ph + s[:, None] * stride_ps + d[None, :] * stride_pd,
        mask=s_mask[:, None] & d_mask[None, :], other=0.0,
    )
    w_sum = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d_mask)


# @triton.jit picks interpreter vs compiler when this module is imported.
_INTERPRETED = isinstance(_paged_decode_kernel, InterpretedFunction)


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    if t.is_cuda:
        # Triton launches on the *current* CUDA device; ranks may hold tensors elsewhere.
        return torch.cuda.device(t.device)
    if not _INTERPRETED:
        raise RuntimeError(
            "adp paged-attention kernels got non-CUDA tensors but Triton is compiling; set "
            "TRITON_INTERPRET=1 before adp_pass.runtime.kernels.paged_attention is first imported"
        )
    return contextlib.nullcontext()


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.dim() == 4, f"cache must be [num_blocks, block_size, kv_heads, head_dim], got {tuple(k_cache.shape)}"
    # One set of strides is passed for both caches.
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "k/v caches differ in shape or strides"
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in _FLOAT_DTYPES, f"bad cache dtype {k_cache.dtype}/{v_cache.dtype}"
    assert k_cache.device == v_cache.device, "k/v caches on different devices"
    block_size = k_cache.shape[1]
    assert block_size >= _MIN_DOT_DIM and block_size & (block_size - 1) == 0, (
        f"block_size must be a power of two >= {_MIN_DOT_DIM}, got {block_size}"
    )


@torch.library.custom_op("adp::reshape_and_cache", mutates_args=("k_cache", "v_cache"))
def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write key/value [T, kv_heads, head_dim] at flat slots; slot -1 is skipped."""
    _check_cache(k_cache, v_cache)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert key.shape == value.shape and key.dim() == 3, f"key/value shapes {tuple(key.shape)} vs {tuple(value.shape)}"
    assert key.shape[1:] == (num_kv_heads, head_dim), f"key {tuple(key.shape)} does not match cache {tuple(k_cache.shape)}"
    assert key.dtype == value.dtype == k_cache.dtype, f"dtype mismatch: {key.dtype}, {value.dtype}, cache {k_cache.dtype}"
    assert slot_mapping.shape == (key.shape[0],) and slot_mapping.dtype in _INDEX_DTYPES, (
        f"slot_mapping must be int32/int64 [{key.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
    )
    assert key.device == value.device == slot_mapping.device == k_cache.device, "tensors on different devices"
    if key.shape[0] == 0:
        return
    with _device_guard(key):
        _reshape_and_cache_kernel[(key.shape[0],)](
            key, value, k_cache, v_cache, slot_mapping,
            *key.stride(), *value.stride(), *k_cache.stride(), slot_mapping.stride(0),
            num_kv_heads, head_dim,
            BLOCK_SIZE=block_size,
            HEADS_PAD=triton.next_power_of_2(num_kv_heads),
            HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        )


@reshape_and_cache.register_fake
def _(key, value, k_cache, v_cache, slot_mapping) -> None:
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _auto_num_splits(q: torch.Tensor, num_kv_heads: int, max_blocks: int) -> int:
    """Split-K only when (sequence, kv head) programs cannot fill the GPU.

    Decided from static shapes (block table width), never from context_lens, so no
    host sync and the choice is stable under CUDA graph capture.
    """
    if not q.is_cuda:
        return 1
    programs = q.shape[0] * num_kv_heads
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, programs), max_blocks // _MIN_BLOCKS_PER_SPLIT, _MAX_SPLITS))


@torch.library.custom_op("adp::paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int = 0,
) -> torch.Tensor:
    """One-token-per-sequence attention over a paged KV cache (GQA).

    q [B, q_heads, head_dim]; block_tables [B, max_blocks]; context_lens [B] (tokens
    visible, including the current one). num_splits: 0 = heuristic, n >= 1 forces n
    KV splits (flash-decoding) combined by log-sum-exp. Returns [B, q_heads, head_dim].
    """
    _check_cache(k_cache, v_cache)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert q.dim() == 3 and q.shape[2] == head_dim, f"q {tuple(q.shape)} vs cache head_dim {head_dim}"
    batch, num_q_heads, _ = q.shape
    assert num_q_heads % num_kv_heads == 0, f"q heads {num_q_heads} not a multiple of kv heads {num_kv_heads}"
    assert q.dtype == k_cache.dtype, f"q dtype {q.dtype} != cache dtype {k_cache.dtype}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.dtype in _INDEX_DTYPES, (
        f"block_tables must be int [B={batch}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}"
    )
    assert context_lens.shape == (batch,) and context_lens.dtype in _INDEX_DTYPES, (
        f"context_lens must be int [{batch}], got {context_lens.dtype} {tuple(context_lens.shape)}"
    )
    assert q.device == k_cache.device == block_tables.device == context_lens.device, "tensors on different devices"
    assert num_splits >= 0, f"num_splits must be >= 0, got {num_splits}"

    out = q.new_empty(q.shape)
    if batch == 0:
        return out
    max_blocks = block_tables.shape[1]
    splits = num_splits or _auto_num_splits(q, num_kv_heads, max_blocks)
    splits = max(1, min(splits, max_blocks))
    group = num_q_heads // num_kv_heads
    head_dim_pad = triton.next_power_of_2(head_dim)
    meta = dict(
        GROUP=group,
        GROUP_PAD=max(_MIN_DOT_DIM, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        HEAD_DIM_PAD=head_dim_pad,
        SPLIT=splits > 1,
        # fp32 caches need ieee dots to stay exact; 16-bit inputs are exact in tf32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    common = (*q.stride(), *k_cache.stride(), *block_tables.stride(), context_lens.stride(0))
    scale_log2 = scale * _LOG2E
    with _device_guard(q):
        if splits == 1:
            _paged_decode_kernel[(batch, num_kv_heads, 1)](
                q, k_cache, v_cache, block_tables, context_lens, out, out,
                *common, out.stride(0), out.stride(1), 0, out.stride(2), 0, 0, 0,
                scale_log2, head_dim, max_blocks, max_blocks, **meta,
            )
            return out
        part = q.new_empty((batch, num_q_heads, splits, head_dim), dtype=torch.float32)
        lse = q.new_empty((batch, num_q_heads, splits), dtype=torch.float32)
        _paged_decode_kernel[(batch, num_kv_heads, splits)](
            q, k_cache, v_cache, block_tables, context_lens, part, lse,
            *common, *part.stride(), *lse.stride(),
            scale_log2, head_dim, max_blocks, triton.cdiv(max_blocks, splits), **meta,
        )
        _combine_splits_kernel[(batch, num_q_heads)](
            part, lse, out, *part.stride(), *lse.stride(), *out.stride(),
            splits, head_dim,
            SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM_PAD=head_dim_pad,
        )
    return out


@paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=0) -> torch.Tensor:
    return q.new_empty(q.shape)

