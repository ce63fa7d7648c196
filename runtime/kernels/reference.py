"""Eager PyTorch implementations of every ``torch.ops.adp.*`` op.

They serve two purposes:

* the ops run them for CPU tensors when Triton compiles instead of interpreting (a GPU machine:
  Triton picks one mode per process, at import, and compiled kernels cannot launch on CPU
  tensors), so CPU ranks (``adp verify`` with gloo, CPU tests) work on GPU machines too;
* the tests compare the kernels with them (tests/kernel_reference.py re-exports them).

Norms, SiLU and RoPE are copied from transformers' Qwen3 code (transformers 5.x,
models/qwen3/modeling_qwen3.py: Qwen3RMSNorm.forward, Qwen3MLP.forward with act_fn = F.silu,
rotate_half, apply_rotary_pos_emb, the residual adds of Qwen3DecoderLayer.forward), so they
round to the model dtype at exactly the points the kernels emulate (docs/kernels.md, Numerics);
tests/test_kernels.py checks the copies against the installed transformers. The attention
functions compute in fp32 and round once at the end; the kernels differ from them only in
summation order and, for 16-bit dots on GPU, P's rounding (docs/kernels.md, "CPU tensors").
Functional ops return new tensors; ``reshape_and_cache`` writes the caches in place.
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm.forward."""
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3DecoderLayer: ``hidden_states = residual + hidden_states`` then the next layernorm."""
    hidden_states = residual + x
    return rms_norm(hidden_states, weight, eps), hidden_states


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Qwen3MLP: ``act_fn(gate_proj(x)) * up_proj(x)`` without the projections."""
    return F.silu(gate) * up


def silu_mul_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """Engine-style fused gate_up_proj output: gate first, up second."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3Attention: q_norm/k_norm on [T, H, D], then apply_rotary_pos_emb (unsqueeze over H).

    ``cos_sin_cache`` rows hold one half of cos then one half of sin (build_cos_sin_cache).
    """
    half = q.shape[-1] // 2
    rows = cos_sin_cache[positions.long()]
    cos = torch.cat((rows[:, :half], rows[:, :half]), dim=-1)  # emb = cat(freqs, freqs)
    sin = torch.cat((rows[:, half:], rows[:, half:]), dim=-1)
    q = rms_norm(q, q_weight, eps)
    k = rms_norm(k, k_weight, eps)
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token ``t``'s key/value ``[kv_heads, head_dim]`` at flat slot ``slot_mapping[t]``
    (block ``slot // block_size``, row ``slot % block_size``); slots < 0 are skipped."""
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    k_cache[slots // block_size, slots % block_size] = key[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = value[keep].to(v_cache.dtype)


def varlen_attention_fp32(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """adp.varlen_attention in fp32, one sequence at a time; fp32 ``[T, q_heads, head_dim]``.

    Sequence n's queries are q rows ``query_start_loc[n] .. query_start_loc[n+1] - 1``; its
    first ``context_lens[n]`` cache positions (clamped to the table's capacity, as the kernel
    does) are gathered token by token through ``block_tables[n]``, so no other cache entry is
    read. Query j sits at position ``context_lens[n] - q_len + j`` and sees the positions up to
    its own; kv head i serves q heads ``i * group .. (i + 1) * group - 1`` (repeat_kv). A query
    before position 0 sees nothing and, like rows past ``query_start_loc[N]``, stays zero.
    """
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    capacity = block_tables.shape[1] * block_size
    starts = query_start_loc.tolist()
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for n, ctx in enumerate(context_lens.tolist()):
        ctx = max(0, min(ctx, capacity))
        q_len = starts[n + 1] - starts[n]
        if q_len <= 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        blocks = block_tables[n].long()[pos // block_size]
        keys = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        values = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        queries = q[starts[n] : starts[n + 1]].float()
        scores = scale * torch.einsum("qhd,khd->hqk", queries, keys)
        q_pos = ctx - q_len + torch.arange(q_len, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        # A row with every key masked would be NaN after softmax; the kernel writes zeros.
        probs = torch.softmax(scores, dim=-1).masked_fill((q_pos < 0)[None, :, None], 0.0)
        out[starts[n] : starts[n + 1]] = torch.einsum("hqk,khd->qhd", probs, values)
    return out


def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """adp.varlen_attention: ``varlen_attention_fp32`` rounded once to q's dtype."""
    return varlen_attention_fp32(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                 scale).to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """adp.paged_decode_attention: q ``[B, q_heads, head_dim]``, one query per sequence at the
    last of its ``context_lens[b]`` positions, i.e. varlen attention with one query per sequence
    (a context of 0 gives zeros, as the kernel's empty range does). Split-K only changes the
    kernel's summation order, so ``num_splits`` has no counterpart here."""
    query_start_loc = torch.arange(q.shape[0] + 1, device=q.device)
    return varlen_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)
