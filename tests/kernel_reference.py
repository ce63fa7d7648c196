"""Eager references for the adp Triton kernels, copied from transformers' Qwen3 modeling code.

Source: transformers/models/qwen3/modeling_qwen3.py (transformers 5.x): Qwen3RMSNorm.forward,
Qwen3MLP.forward (act_fn = SiLUActivation -> F.silu), rotate_half, apply_rotary_pos_emb,
Qwen3RotaryEmbedding.compute_default_rope_parameters / forward, and the residual adds of
Qwen3DecoderLayer.forward. tests/test_kernels.py checks these copies against the installed
transformers so drift is caught. Also used by bench/bench_kernels.py.
"""

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm.forward."""
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3DecoderLayer: ``hidden_states = residual + hidden_states`` then the next layernorm."""
    hidden_states = residual + x
    return rms_norm_ref(hidden_states, weight, eps), hidden_states


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Qwen3MLP: ``act_fn(gate_proj(x)) * up_proj(x)`` without the projections."""
    return F.silu(gate) * up


def silu_mul_fused_ref(gate_up: torch.Tensor) -> torch.Tensor:
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


def rotary_cos_sin_ref(
    positions: torch.Tensor, head_dim: int, rope_theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3RotaryEmbedding (default rope, attention_scaling 1.0) for 1-D ``positions``."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3Attention: q_norm/k_norm on [T, H, D], then apply_rotary_pos_emb (unsqueeze over H)."""
    half = q.shape[-1] // 2
    rows = cos_sin_cache[positions]
    cos = torch.cat((rows[:, :half], rows[:, :half]), dim=-1)  # emb = cat(freqs, freqs)
    sin = torch.cat((rows[:, half:], rows[:, half:]), dim=-1)
    q = rms_norm_ref(q, q_weight, eps)
    k = rms_norm_ref(k, k_weight, eps)
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)


def patch_interpreter_bf16_rounding(mp) -> None:
    """Make the Triton interpreter's fp32->bf16 cast round to nearest even, as GPUs do.

    The interpreter (triton 3.x, ``InterpreterBuilder.cast_impl``) truncates fp32->bf16, which
    would make every bf16 rounding point in the kernels differ from eager and from compiled
    kernels. ``mp`` is a ``pytest.MonkeyPatch``.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original = InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.array(src.data, dtype=np.float32)
            rounded = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy()
            return TensorHandle(rounded.view(np.uint16).reshape(data.shape), dst_type.scalar)
        return original(self, src, dst_type)

    mp.setattr(InterpreterBuilder, "cast_impl", cast_impl)
    mp.setattr(InterpreterBuilder, "create_fp_trunc", cast_impl)  # bound directly in some versions


def varlen_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """adp.varlen_attention in fp32, one sequence at a time (not from transformers).

    Sequence n's KV is gathered token by token through its block table; its query j sits at
    position ``context_lens[n] - q_len + j`` and sees cache positions up to its own. Rows past
    ``query_start_loc[-1]`` stay zero. Returns fp32 ``[T, q_heads, head_dim]`` on q's device.
    """
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    starts = query_start_loc.tolist()
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for n, ctx in enumerate(context_lens.tolist()):
        q_len = starts[n + 1] - starts[n]
        if q_len == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        blocks = block_tables[n].long()[pos // block_size]
        keys = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        values = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        queries = q[starts[n] : starts[n + 1]].float()
        scores = scale * torch.einsum("qhd,khd->hqk", queries, keys)
        q_pos = ctx - q_len + torch.arange(q_len, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[starts[n] : starts[n + 1]] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values)
    return out


def poisoned_paged_cache(context_lens, block_size, kv_heads, head_dim, dtype, gen, spare_blocks):
    """k/v caches full of NaN except each sequence's visible tokens (random), reached through
    shuffled block tables with one spare column: a read past a context, or of a wrong block,
    poisons the output. ``spare_blocks`` unused blocks beyond those the contexts need."""
    need = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    block_tables = torch.zeros(len(context_lens), max(need, default=0) + 1, dtype=torch.int32)
    used = 0
    for i, (n, nb) in enumerate(zip(context_lens, need)):
        block_tables[i, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
        pos = torch.arange(n)
        blocks = block_tables[i].long()[pos // block_size]
        k_cache[blocks, pos % block_size] = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v_cache[blocks, pos % block_size] = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
    return k_cache, v_cache, block_tables
