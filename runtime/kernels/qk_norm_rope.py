"""``adp::qk_norm_rope``: Qwen3's per-head q/k RMSNorm followed by NeoX (rotate-half) RoPE.

transformers (Qwen3Attention.forward + apply_rotary_pos_emb)::

    q = q_norm(q)                                    # Qwen3RMSNorm over head_dim
    q = (q * cos) + (rotate_half(q) * sin)           # cos/sin already in the model dtype

Every product and the sum is a separate bf16/fp16 tensor in eager mode, so the kernel rounds after
each of them (rotate_half's negation is exact). One program handles ``BLOCK_H`` heads of one token,
q heads first, then k heads, so a single launch covers both.
"""

import torch
import triton
import triton.language as tl

from . import reference
from .utils import block_and_warps, eager_on_cpu, launch_guard, pdl, previous_kernel_done, round_to

# Elements per program (BLOCK_H heads x head_dim): 1024 = 8 heads of 128, like the silu tile.
_TILE = 1024


@triton.jit
def _norm_rope_tile(
    x_ptr,
    out_ptr,
    w_ptr,
    cos,
    sin,
    head0,
    n_heads,
    head_stride,
    eps,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Heads [head0, head0 + BLOCK_H) of one token; x_ptr/out_ptr point at that token's row."""
    dtype = x_ptr.dtype.element_ty
    heads = head0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    mask = (heads < n_heads)[:, None] & col_mask[None, :]
    x_offs = heads[:, None].to(tl.int64) * head_stride + cols[None, :]
    x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    # Qwen3RMSNorm per head: fp32 statistics, round to dtype, times weight, round (dtype result).
    rstd = tl.math.rsqrt(tl.sum(x1 * x1 + x2 * x2, axis=1) / (2 * HALF) + eps)[:, None]
    n1 = round_to(round_to(x1 * rstd, dtype) * w1, dtype)
    n2 = round_to(round_to(x2 * rstd, dtype) * w2, dtype)

    # rotate_half: first half gets -x2, second half gets x1; each product and the sum rounded.
    o1 = round_to(n1 * cos, dtype) - round_to(n2 * sin, dtype)
    o2 = round_to(n2 * cos, dtype) + round_to(n1 * sin, dtype)
    out_offs = heads[:, None].to(tl.int64) * (2 * HALF) + cols[None, :]  # output is contiguous
    tl.store(out_ptr + out_offs, o1.to(dtype), mask=mask)
    tl.store(out_ptr + out_offs + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    q_w_ptr,
    k_w_ptr,
    cache_ptr,
    pos_ptr,
    q_tok_stride,
    q_head_stride,
    k_tok_stride,
    k_head_stride,
    cache_stride,
    n_q_heads,
    n_k_heads,
    eps,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    previous_kernel_done(PDL)
    tok = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)

    # cos in columns [0, HALF), sin in [HALF, 2*HALF): cat(freqs, freqs) makes both halves equal.
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    row = cache_ptr + pos * cache_stride
    cos = tl.load(row + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]

    if head_block < n_q_blocks:
        _norm_rope_tile(
            q_ptr + tok * q_tok_stride,
            q_out_ptr + tok * (n_q_heads * 2 * HALF),
            q_w_ptr, cos, sin, head_block * BLOCK_H, n_q_heads, q_head_stride, eps,
            HALF, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip
    else:
        _norm_rope_tile(
            k_ptr + tok * k_tok_stride,
            k_out_ptr + tok * (n_k_heads * 2 * HALF),
            k_w_ptr, cos, sin, (head_block - n_q_blocks) * BLOCK_H, n_k_heads, k_head_stride, eps,
            HALF, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"need q [T, Hq, D] and k [T, Hk, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    tokens, head_dim = q.shape[0], q.shape[2]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
        raise ValueError(f"q/k weights must be [{head_dim}]")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"cos_sin_cache must be [max_position, {head_dim}]")
    if positions.shape != (tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 of shape [{tokens}]")
    # One dtype throughout, as in a model loaded in one dtype: then every eager intermediate has
    # that dtype and the kernel's rounding points are exactly eager's.
    dtypes = {t.dtype for t in (q, k, q_weight, k_weight, cos_sin_cache)}
    if len(dtypes) != 1:
        raise ValueError(f"q, k, weights and cos_sin_cache must share one dtype, got {dtypes}")


def _empty_outputs(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous outputs (the kernel writes them with implied strides)."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return q_out, torch.empty(k.shape, dtype=k.dtype, device=k.device)


@torch.library.custom_op("adp::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm then rotary embedding of q and k; outputs are new contiguous tensors."""
    _check(q, k, q_weight, k_weight, cos_sin_cache, positions)
    if eager_on_cpu(_qk_norm_rope_kernel, q, k, q_weight, k_weight, cos_sin_cache, positions):
        q_out, k_out = reference.qk_norm_rope(q, k, q_weight, k_weight, cos_sin_cache, positions, eps)
        return q_out.contiguous(), k_out.contiguous()
    q_out, k_out = _empty_outputs(q, k)
    tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    if tokens == 0:
        return q_out, k_out
    # Strided views (e.g. slices of a fused qkv buffer) are fine as long as head_dim is unit-stride.
    q = q if q.stride(2) == 1 else q.contiguous()
    k = k if k.stride(2) == 1 else k.contiguous()
    cache = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(n_q_heads, n_k_heads)), max(1, _TILE // (2 * block_half)))
    _, num_warps = block_and_warps(block_h * 2 * block_half)
    grid = (tokens, triton.cdiv(n_q_heads, block_h) + triton.cdiv(n_k_heads, block_h))
    with launch_guard(_qk_norm_rope_kernel, q, k, q_weight, k_weight, cache, positions):
        _qk_norm_rope_kernel[grid](
            q, k, q_out, k_out,
            q_weight.contiguous(), k_weight.contiguous(), cache, positions.contiguous(),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cache.stride(0),
            n_q_heads, n_k_heads, eps,
            HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps, **pdl(q),
        )  # fmt: skip
    return q_out, k_out


@qk_norm_rope.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, q_weight, k_weight, cos_sin_cache, positions)
    return _empty_outputs(q, k)


def build_cos_sin_cache(
    max_position: int,
    head_dim: int,
    rope_theta: float,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[max_position, head_dim]`` table: cos in the first half of the columns, sin in the second.

    Bit-identical to Qwen3RotaryEmbedding (default rope) on the same device: inv_freq is computed
    on CPU in fp32 (as at transformers' module init), freqs/cos/sin in fp32 on ``device``, then
    cast to ``dtype``.
    """
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    positions = torch.arange(max_position, dtype=torch.int64, device=device).float()
    freqs = positions[:, None] * inv_freq.to(device)[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
