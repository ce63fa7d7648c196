"""Paged KV cache write + paged decode attention (GQA) as Triton kernels.

Registered as ``torch.ops.adp.reshape_and_cache``, ``torch.ops.adp.paged_decode_attention`` and
``torch.ops.adp.cache_and_paged_decode`` (the two in one launch: the decode kernel first writes
the step's new token) on import. Cache layout (vLLM "flash" layout):
``[num_blocks, block_size, num_kv_heads, head_dim]``; see docs/kv_cache.md and, for the
decode kernel's design, docs/kernels.md. On CPU the kernels run under ``TRITON_INTERPRET=1``;
when Triton compiles, the ops send CPU tensors to ``reference`` (``utils.eager_on_cpu``).
An fp8 cache (float8_e4m3fn) comes with fp32 one-element ``k_scale`` / ``v_scale`` tensors: the
writes store ``e4m3(clamp(x / scale))``, the reads use ``fp8 * scale`` (docs/fp8.md, "FP8 KV cache").
"""

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from adp_pass.errors import AdpError

from . import reference
from .fp8_quant import to_e4m3
from .utils import device_index, eager_on_cpu, pdl, previous_kernel_done

# --- decode launch configuration (edit from bench/tune_paged_attention.py on the target GPU) ---
# Chosen per shape in Python, never autotuned at run time: the op runs inside CUDA graphs and its
# first call must not benchmark. Keyed by head_dim rounded up to a power of two; the config is for
# 16-bit caches (fp32 caches halve `tokens`: twice the bytes per token).
#   tokens      KV tokens per loop iteration (any power of two >= 16; need not match block_size:
#               block ids are gathered per token), i.e. the bytes each program has in flight
#   num_warps   Triton num_warps of the decode kernel
#   num_stages  tl.range num_stages of the KV loop. The pipeliner splits the stages between the
#               block-table load and the K/V loads whose addresses it feeds, so a program keeps
#               (num_stages - 1) // 2 K/V tiles in flight while it computes one: 5 -> 2, 7 -> 3;
#               2-4 issue the next tile's loads only after this one is consumed (seen in the TTGIR
#               for sm_90, triton 3.9). Shared memory ~ that many x tokens x head_dim x 2 (K, V) x
#               2 bytes: 5 with tokens=32 at head_dim 128 takes 38 KB, so 5 programs fit an SM.
#   native_dot  16-bit caches: dots on the cache dtype (P rounded to it, like FlashAttention)
#               instead of tf32 dots on fp32 copies (exact operands, P keeps 10 bits)
# KV_EVICTION: the L2 policy of the K/V tile loads. Each tile is read once per step, so
# "evict_first" keeps the stream from pushing out lines the step will read again (with the opt-in
# weight prefetch, runtime/lower/prefetch_weights.py, the next projection's weight). On its own it
# measured no change on the H200 (Qwen3-8B 64 x 512 decode graph: 6.095 vs 6.096 ms).
KV_EVICTION = "evict_first"
DECODE_CONFIGS = {
    64: dict(tokens=64, num_warps=4, num_stages=5, native_dot=True),
    128: dict(tokens=64, num_warps=4, num_stages=3, native_dot=True),  # tuned on H200
    256: dict(tokens=16, num_warps=4, num_stages=5, native_dot=True),
}
# Split-K (flash-decoding) when the (sequence, kv head) programs are few:
#   programs_per_sm   split until batch * kv_heads * splits reaches this many programs per SM
#   min_split_tokens  a split covers at least this many tokens of the block table's capacity
#                     (below that the partial write + combine launch cost more than they buy)
#   max_splits        upper bound on splits
SPLIT_K = dict(programs_per_sm=3, min_split_tokens=256, max_splits=32)  # tuned on H200

_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# An fp8 cache (docs/fp8.md, "FP8 KV cache") holds e4m3 codes of x / scale, with one fp32 K and V
# scale per layer; q and the new k/v stay in a float dtype.
_FP8 = getattr(torch, "float8_e4m3fn", None)
_CACHE_DTYPES = _FLOAT_DTYPES + ((_FP8,) if _FP8 is not None else ())
# tl.dot needs every dimension >= 16 on GPU, so the q-head group is padded to 16 rows.
_MIN_DOT_DIM = 16
_INT32_MAX = 2**31 - 1
_LOG2E = 1.4426950408889634


@triton.jit
def scores(q, k, NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``q @ k.T`` in fp32. bf16/fp16 products are exact in the fp32 accumulator, so the native
    dot gives the same scores as the fp32 path."""
    # if/else, not an early return: compiled Triton also builds the code after a return in a
    # constexpr branch (the interpreter does not), and that code is wrong for NATIVE_DOT.
    if NATIVE_DOT:
        s = tl.dot(q, tl.trans(k))
    else:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)
    return s


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        GUARD_EMPTY: tl.constexpr):
    """One flash-attention update with base-2 scores ``s`` (masked keys -inf) and their values
    ``v``: the new running max, sum and accumulator. ``GUARD_EMPTY``: rows may have seen no key
    yet (m = -inf), so subtract 0 there instead of -inf - -inf."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if GUARD_EMPTY:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if NATIVE_DOT:
        pv = tl.dot(p.to(v.dtype), v)
    else:
        pv = tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def quantize_kv(x, scale_ptr, EXACT_BITS: tl.constexpr):
    """What an fp8 cache stores for ``x``: ``reference.quantize_kv``, bit for bit (IEEE division,
    clamp to the e4m3 range, round to nearest even; on the bits under the interpreter, whose own
    fp32 -> fp8 cast is wrong: runtime/kernels/fp8_quant.py)."""
    y = tl.math.div_rn(x.to(tl.float32), tl.load(scale_ptr))
    return to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0), EXACT_BITS)


@triton.jit
def load_kv_as(x, q, NATIVE_DOT: tl.constexpr):
    """An fp8 cache tile widened for the dots: to q's 16-bit dtype (native dots) or fp32, both
    exact (e4m3 has 4 significant bits and a narrower exponent range than either)."""
    if NATIVE_DOT:
        y = x.to(q.dtype)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_slot,
    num_kv_heads, head_dim, k_scale_ptr, v_scale_ptr,
    BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    KV_FP8: tl.constexpr = False, EXACT_BITS: tl.constexpr = False, PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
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
    if KV_FP8:
        k = quantize_kv(k, k_scale_ptr, EXACT_BITS)
        v = quantize_kv(v, v_scale_ptr, EXACT_BITS)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
    key_ptr, value_ptr, slot_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb, stride_btn, stride_cl,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_kb, stride_kh, stride_kd,
    stride_vb, stride_vh, stride_vd,
    stride_slot,
    qk_scale_log2, max_tokens, num_splits, k_scale_ptr, v_scale_ptr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, TOKENS: tl.constexpr,
    NUM_STAGES: tl.constexpr, SPLIT: tl.constexpr, NATIVE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, IDX64: tl.constexpr, EVICTION: tl.constexpr,
    WRITE_NEW: tl.constexpr, KV_FP8: tl.constexpr = False, EXACT_BITS: tl.constexpr = False,
    PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)  # before any load: q and the new k/v are the last kernel's output
    # int32 index math throughout (the wrapper checks every extent fits); only the cache
    # offset may need int64 (IDX64, decided from the cache's extent on the host).
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # Clamp to the table's capacity so a context_len beyond it cannot read out of bounds.
    ctx = tl.load(context_lens_ptr + seq * stride_cl)
    ctx = tl.maximum(tl.minimum(ctx, max_tokens), 0).to(tl.int32)
    if SPLIT:
        # Splits cut this sequence's own context, not the table width: under CUDA graphs the
        # table is as wide as the longest sequence served, and cutting that would leave all
        # the work in the first splits. Chunks are whole tiles, so only the last tile masks.
        per = tl.cdiv(tl.cdiv(ctx, num_splits), TOKENS) * TOKENS
        lo = split * per
        hi = tl.minimum(lo + per, ctx)
    else:
        lo = 0
        hi = ctx

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    t = tl.arange(0, TOKENS)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g  # HF repeat_kv order: kv head i serves q heads i*GROUP ..

    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if not NATIVE_DOT:
        q = q.to(tl.float32)
    if KV_FP8:
        # Scores of the e4m3 codes times k_scale: folded into the softmax scale (one multiply per
        # program, none per element); v_scale likewise multiplies the output once.
        qk_scale_log2 = qk_scale_log2 * tl.load(k_scale_ptr)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    table = block_tables_ptr + seq * stride_btb
    head_off = kvh * stride_ch
    if WRITE_NEW:
        # Fused reshape_and_cache (un-split launches only): this program stores its kv head's
        # row of the sequence's new token at slot_mapping[seq], then reads it back in the loop
        # like any cached token. A slot lies in its own sequence's blocks, which no other
        # program of the launch reads, so a CTA barrier is all the synchronisation needed: it
        # orders these global stores before every warp's later loads (the loop's cp.async
        # prologue is issued after it).
        slot = tl.load(slot_ptr + seq * stride_slot)
        # slot < 0 (padding): no lane is written. (A bound, not `mask & scalar_bool`, which
        # the interpreter mis-types.)
        new_mask = d < tl.where(slot >= 0, HEAD_DIM, 0)
        if IDX64:
            slot = slot.to(tl.int64)
        else:
            slot = slot.to(tl.int32)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + head_off + d * stride_cd
        new_k = tl.load(key_ptr + seq * stride_kb + kvh * stride_kh + d * stride_kd, mask=new_mask)
        new_v = tl.load(value_ptr + seq * stride_vb + kvh * stride_vh + d * stride_vd, mask=new_mask)
        if KV_FP8:
            new_k = quantize_kv(new_k, k_scale_ptr, EXACT_BITS)
            new_v = quantize_kv(new_v, v_scale_ptr, EXACT_BITS)
        tl.store(k_cache_ptr + dst, new_k, mask=new_mask)
        tl.store(v_cache_ptr + dst, new_v, mask=new_mask)
        tl.debug_barrier()
    # One iteration reads TOKENS tokens (several KV blocks): the block id of every token is
    # gathered from the table (repeats hit L1), so tiles need not align with blocks. The
    # pipeliner prefetches table entries and K/V tiles ahead into shared memory (cp.async); see
    # num_stages at DECODE_CONFIGS for how deep.
    for start in tl.range(lo, hi, TOKENS, num_stages=NUM_STAGES):
        tok = start + t
        valid = tok < hi
        phys = tl.load(table + (tok // BLOCK_SIZE) * stride_btn, mask=valid, other=0)
        if IDX64:
            phys = phys.to(tl.int64)
        else:
            phys = phys.to(tl.int32)
        row = phys * stride_cb + (tok % BLOCK_SIZE) * stride_cs + head_off
        kv_off = row[:, None] + d[None, :] * stride_cd
        if HEAD_DIM == HEAD_DIM_PAD:
            kv_mask = valid[:, None]  # no per-column predicate when head_dim needs no padding
        else:
            kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0, eviction_policy=EVICTION)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0, eviction_policy=EVICTION)
        if KV_FP8:
            k = load_kv_as(k, q, NATIVE_DOT)
            v = load_kv_as(v, q, NATIVE_DOT)
        s = tl.where(valid[None, :], scores(q, k, NATIVE_DOT, DOT_PRECISION) * qk_scale_log2,
                     float("-inf"))
        # Every visited tile holds >= 1 valid token, so m_new is finite here: no guard.
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, NATIVE_DOT, DOT_PRECISION, False)

    # Empty range (context_len 0, or a split past the end): emit zeros, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if KV_FP8:
        out = out * tl.load(v_scale_ptr)  # split partials too: the combine is linear in them
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
    SPLITS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
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
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in _CACHE_DTYPES, f"bad cache dtype {k_cache.dtype}/{v_cache.dtype}"
    assert k_cache.device == v_cache.device, "k/v caches on different devices"
    block_size = k_cache.shape[1]
    assert block_size >= _MIN_DOT_DIM and block_size & (block_size - 1) == 0, (
        f"block_size must be a power of two >= {_MIN_DOT_DIM}, got {block_size}"
    )


class KvScaleError(AdpError, ValueError):
    """The k_scale / v_scale given with a KV cache do not fit it."""


def check_kv_scales(k_cache: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor]) -> None:
    """An fp8 cache needs both scales, fp32 one-element tensors on its device; another cache none."""
    if k_cache.dtype != _FP8:
        if k_scale is not None or v_scale is not None:
            raise KvScaleError(f"k_scale/v_scale were given with a {k_cache.dtype} KV cache; only an fp8 "
                               "(float8_e4m3fn) cache is scaled: pass None")
        return
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None:
            raise KvScaleError(f"an fp8 KV cache needs {name}: pass an fp32 tensor of one element "
                               "(1.0 if the values need no scaling)")
        if t.dtype != torch.float32 or t.numel() != 1 or t.device != k_cache.device:
            raise KvScaleError(f"{name} must be an fp32 tensor of one element on {k_cache.device}, got "
                               f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _scale_args(k_cache: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor]) -> tuple:
    """The kernels' (k_scale_ptr, v_scale_ptr, constexprs): a 16/32-bit cache passes the cache itself
    as the never-read pointers."""
    if k_cache.dtype != _FP8:
        return k_cache, k_cache, dict(KV_FP8=False, EXACT_BITS=False)
    return k_scale, v_scale, dict(KV_FP8=True, EXACT_BITS=_INTERPRETED)


def _check_new_tokens(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """reshape_and_cache's inputs (also cache_and_paged_decode's)."""
    _check_cache(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    assert key.shape == value.shape and key.dim() == 3, f"key/value shapes {tuple(key.shape)} vs {tuple(value.shape)}"
    assert key.shape[1:] == (num_kv_heads, head_dim), f"key {tuple(key.shape)} does not match cache {tuple(k_cache.shape)}"
    # An fp8 cache takes new tokens in any float dtype (the write quantizes them).
    assert key.dtype == value.dtype and (key.dtype == k_cache.dtype or (
        k_cache.dtype == _FP8 and key.dtype in _FLOAT_DTYPES)), (
        f"dtype mismatch: {key.dtype}, {value.dtype}, cache {k_cache.dtype}"
    )
    assert slot_mapping.shape == (key.shape[0],) and slot_mapping.dtype in _INDEX_DTYPES, (
        f"slot_mapping must be int32/int64 [{key.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
    )
    assert key.device == value.device == slot_mapping.device == k_cache.device, "tensors on different devices"


def _launch_reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
                              v_scale: Optional[torch.Tensor] = None) -> None:
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    k_scale_ptr, v_scale_ptr, fp8_meta = _scale_args(k_cache, k_scale, v_scale)
    with _device_guard(key):
        _reshape_and_cache_kernel[(key.shape[0],)](
            key, value, k_cache, v_cache, slot_mapping,
            *key.stride(), *value.stride(), *k_cache.stride(), slot_mapping.stride(0),
            num_kv_heads, head_dim, k_scale_ptr, v_scale_ptr,
            BLOCK_SIZE=block_size,
            HEADS_PAD=triton.next_power_of_2(num_kv_heads),
            HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
            **fp8_meta, **pdl(key),
        )


@torch.library.custom_op("adp::reshape_and_cache", mutates_args=("k_cache", "v_cache"))
def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Write key/value [T, kv_heads, head_dim] at flat slots; slot -1 is skipped. An fp8 cache
    (with its fp32 one-element ``k_scale`` / ``v_scale``) stores ``e4m3(clamp(x / scale))``."""
    _check_new_tokens(key, value, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, k_scale, v_scale)
    if key.shape[0] == 0:
        return
    if eager_on_cpu(_reshape_and_cache_kernel, key, k_cache):
        reference.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    _launch_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@reshape_and_cache.register_fake
def _(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _auto_num_splits(q: torch.Tensor, num_kv_heads: int, max_tokens: int) -> int:
    """Split-K only when (sequence, kv head) programs cannot fill the GPU (SPLIT_K).

    Decided from static shapes (batch, heads, block-table capacity), never from context_lens,
    so no host sync and the choice is stable under CUDA graph capture; the kernel then cuts
    each sequence's actual context into that many chunks.
    """
    if not q.is_cuda:
        return 1
    programs = q.shape[0] * num_kv_heads
    sms = _sm_count(device_index(q.device))
    target = SPLIT_K["programs_per_sm"] * sms
    if programs >= target:
        return 1
    by_length = max(1, max_tokens // SPLIT_K["min_split_tokens"])
    return max(1, min(triton.cdiv(target, programs), by_length, SPLIT_K["max_splits"]))


def decode_config(q: torch.Tensor, k_cache: torch.Tensor, max_blocks: int, num_splits: int = 0) -> dict:
    """The launch config the op uses for these shapes: DECODE_CONFIGS by head_dim, plus splits."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    head_dim_pad = triton.next_power_of_2(head_dim)
    cfg = dict(DECODE_CONFIGS.get(head_dim_pad) or DECODE_CONFIGS[max(DECODE_CONFIGS)])
    if k_cache.dtype == torch.float32:
        cfg["tokens"] = max(_MIN_DOT_DIM, cfg["tokens"] // 2)
    cfg["num_splits"] = num_splits or _auto_num_splits(q, num_kv_heads, max_blocks * block_size)
    return cfg


def _max_offset(t: torch.Tensor) -> int:
    """Largest element offset (from the data pointer) that indexing ``t`` can produce."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def _cache_needs_int64(k_cache: torch.Tensor) -> bool:
    # int64 multiplies cost issue slots on every gathered row; only caches past 2^31 elements need them.
    return _max_offset(k_cache) > _INT32_MAX


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    tokens: int,
    num_warps: int,
    num_stages: int,
    native_dot: bool,
    num_splits: int,
    new_key: Optional[torch.Tensor] = None,
    new_value: Optional[torch.Tensor] = None,
    slot_mapping: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the decode kernel with an explicit config (the op passes ``decode_config``'s).

    With ``new_key``/``new_value`` ``[B, kv_heads, head_dim]`` and ``slot_mapping`` ``[B]``, first
    write each sequence's new token into the caches (as ``reshape_and_cache``; slot < 0 skips):
    inside the decode kernel when the launch is un-split, else by a separate write launch.
    An fp8 cache is read and written with ``k_scale`` / ``v_scale``.
    Inputs are checked by the ops; tests and bench/tune_paged_attention.py call this directly.
    """
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    batch, num_q_heads, _ = q.shape
    k_scale_ptr, v_scale_ptr, fp8_meta = _scale_args(k_cache, k_scale, v_scale)
    assert tokens >= _MIN_DOT_DIM and tokens & (tokens - 1) == 0, f"tokens must be a power of two >= 16, got {tokens}"
    write_new = new_key is not None
    assert write_new == (new_value is not None) == (slot_mapping is not None), (
        "new_key, new_value and slot_mapping go together"
    )
    out = q.new_empty(q.shape)
    if batch == 0:
        return out
    max_blocks = block_tables.shape[1]
    max_tokens = max_blocks * block_size
    # More splits than tiles of the longest possible context would only add empty programs.
    splits = max(1, min(num_splits, triton.cdiv(max_tokens, tokens)))
    group = num_q_heads // num_kv_heads
    head_dim_pad = triton.next_power_of_2(head_dim)
    # The interpreter multiplies bf16 dot operands as raw uint16 bits (triton 3.x), so there
    # bf16 always takes the fp32 path; fp16 exercises the native path on CPU.
    native = native_dot and q.dtype != torch.float32 and not (_INTERPRETED and q.dtype == torch.bfloat16)
    part_numel = batch * num_q_heads * splits * head_dim
    news = (new_key, new_value, slot_mapping) if write_new else ()
    for t in (q, block_tables, context_lens, *news):
        assert _max_offset(t) <= _INT32_MAX, f"tensor of shape {tuple(t.shape)} too large for int32 indexing"
    assert part_numel <= _INT32_MAX and max_tokens <= _INT32_MAX, "batch or block table too large for int32 indexing"
    meta = dict(
        GROUP=group,
        GROUP_PAD=max(_MIN_DOT_DIM, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        TOKENS=tokens,
        NUM_STAGES=num_stages,
        SPLIT=splits > 1,
        NATIVE_DOT=native,
        # fp32 caches need ieee dots to stay exact; 16-bit inputs are exact in tf32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        IDX64=_cache_needs_int64(k_cache),
        EVICTION=KV_EVICTION,
        num_warps=num_warps,
        **fp8_meta,
        **pdl(q),
    )
    common = (*q.stride(), *k_cache.stride(), *block_tables.stride(), context_lens.stride(0))
    scale_log2 = scale * _LOG2E
    # Without a write, q/context_lens stand in for the unused new-token pointers.
    no_write = (q, q, context_lens)
    no_write_strides = (0,) * 7
    with _device_guard(q):
        if splits == 1:
            if write_new:
                new_ptrs = (new_key, new_value, slot_mapping)
                new_strides = (*new_key.stride(), *new_value.stride(), slot_mapping.stride(0))
            else:
                new_ptrs, new_strides = no_write, no_write_strides
            _paged_decode_kernel[(batch, num_kv_heads, 1)](
                q, k_cache, v_cache, block_tables, context_lens, out, out, *new_ptrs,
                *common, out.stride(0), out.stride(1), 0, out.stride(2), 0, 0, 0, *new_strides,
                scale_log2, max_tokens, 1, k_scale_ptr, v_scale_ptr, **meta, WRITE_NEW=write_new,
            )
            return out
        if write_new:
            # Split-K: several CTAs read one (sequence, kv head)'s rows and a CTA barrier cannot
            # order them after another CTA's write, so the token is written by its own launch.
            _launch_reshape_and_cache(new_key, new_value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        part = q.new_empty((batch, num_q_heads, splits, head_dim), dtype=torch.float32)
        lse = q.new_empty((batch, num_q_heads, splits), dtype=torch.float32)
        _paged_decode_kernel[(batch, num_kv_heads, splits)](
            q, k_cache, v_cache, block_tables, context_lens, part, lse, *no_write,
            *common, *part.stride(), *lse.stride(), *no_write_strides,
            scale_log2, max_tokens, splits, k_scale_ptr, v_scale_ptr, **meta, WRITE_NEW=False,
        )
        _combine_splits_kernel[(batch, num_q_heads)](
            part, lse, out, *part.stride(), *lse.stride(), *out.stride(),
            splits, head_dim,
            SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM_PAD=head_dim_pad, **pdl(q),
        )
    return out


def _check_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, num_splits: int) -> None:
    """paged_decode_attention's inputs (also cache_and_paged_decode's)."""
    _check_cache(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    assert q.dim() == 3 and q.shape[2] == head_dim, f"q {tuple(q.shape)} vs cache head_dim {head_dim}"
    batch, num_q_heads, _ = q.shape
    assert num_q_heads % num_kv_heads == 0, f"q heads {num_q_heads} not a multiple of kv heads {num_kv_heads}"
    assert q.dtype == k_cache.dtype or (k_cache.dtype == _FP8 and q.dtype in _FLOAT_DTYPES), (
        f"q dtype {q.dtype} != cache dtype {k_cache.dtype}"
    )
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.dtype in _INDEX_DTYPES, (
        f"block_tables must be int [B={batch}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}"
    )
    assert context_lens.shape == (batch,) and context_lens.dtype in _INDEX_DTYPES, (
        f"context_lens must be int [{batch}], got {context_lens.dtype} {tuple(context_lens.shape)}"
    )
    assert q.device == k_cache.device == block_tables.device == context_lens.device, "tensors on different devices"
    assert num_splits >= 0, f"num_splits must be >= 0, got {num_splits}"


@torch.library.custom_op("adp::paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int = 0,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One-token-per-sequence attention over a paged KV cache (GQA).

    q [B, q_heads, head_dim]; block_tables [B, max_blocks]; context_lens [B] (tokens
    visible, including the current one). num_splits: 0 = heuristic, n >= 1 forces n
    KV splits (flash-decoding) combined by log-sum-exp. Returns [B, q_heads, head_dim]. An fp8
    cache is read as ``fp8 * k_scale`` / ``fp8 * v_scale``.
    """
    _check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, num_splits)
    check_kv_scales(k_cache, k_scale, v_scale)
    if eager_on_cpu(_paged_decode_kernel, q, k_cache):
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                k_scale, v_scale)
    cfg = decode_config(q, k_cache, block_tables.shape[1], num_splits)
    return paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, **cfg,
                        k_scale=k_scale, v_scale=v_scale)


@paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=0, k_scale=None, v_scale=None) -> torch.Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("adp::cache_and_paged_decode", mutates_args=("k_cache", "v_cache"))
def cache_and_paged_decode(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int = 0,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)`` then
    ``paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)``,
    with the same results, in one launch when the decode is not split.

    key/value ``[B, kv_heads, head_dim]`` (cache dtype, any strides): each sequence's new token,
    written at ``slot_mapping[b]`` (-1 skips it); ``context_lens[b]`` counts it when it is to be
    attended to, as for paged_decode_attention. An fp8 cache takes ``k_scale`` / ``v_scale`` for both.
    """
    _check_new_tokens(key, value, k_cache, v_cache, slot_mapping)
    _check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, num_splits)
    check_kv_scales(k_cache, k_scale, v_scale)
    assert key.shape[0] == q.shape[0], f"one new token per sequence: key {tuple(key.shape)} vs q {tuple(q.shape)}"
    assert key.device == q.device, "tensors on different devices"
    if eager_on_cpu(_paged_decode_kernel, q, key, k_cache):
        reference.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                k_scale, v_scale)
    cfg = decode_config(q, k_cache, block_tables.shape[1], num_splits)
    return paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, **cfg,
                        new_key=key, new_value=value, slot_mapping=slot_mapping,
                        k_scale=k_scale, v_scale=v_scale)


@cache_and_paged_decode.register_fake
def _(q, key, value, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale, num_splits=0,
      k_scale=None, v_scale=None) -> torch.Tensor:
    return q.new_empty(q.shape)
