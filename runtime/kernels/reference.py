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


# FP8 KV cache (docs/fp8.md, "FP8 KV cache"): e4m3's largest finite value.
E4M3_MAX = 448.0


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == getattr(torch, "float8_e4m3fn", None)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an fp8 cache stores for ``x``: ``e4m3(clamp(x / scale, -448, 448))`` (fp32 division,
    round to nearest even); ``scale`` an fp32 one-element tensor."""
    return (x.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 values of cache entries: ``fp8 * scale`` for an fp8 cache, else the entries."""
    if is_fp8(cache):
        return cache.float() * scale.float()
    return cache.float()


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write token ``t``'s key/value ``[kv_heads, head_dim]`` at flat slot ``slot_mapping[t]``
    (block ``slot // block_size``, row ``slot % block_size``); slots < 0 are skipped. An fp8
    cache stores ``quantize_kv(key, k_scale)`` / ``quantize_kv(value, v_scale)``."""
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    if is_fp8(k_cache):
        k_cache[slots // block_size, slots % block_size] = quantize_kv(key[keep], k_scale)
        v_cache[slots // block_size, slots % block_size] = quantize_kv(value[keep], v_scale)
        return
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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """adp.varlen_attention in fp32, one sequence at a time; fp32 ``[T, q_heads, head_dim]``.

    Sequence n's queries are q rows ``query_start_loc[n] .. query_start_loc[n+1] - 1``; its
    first ``context_lens[n]`` cache positions (clamped to the table's capacity, as the kernel
    does) are gathered token by token through ``block_tables[n]``, so no other cache entry is
    read. Query j sits at position ``context_lens[n] - q_len + j`` and sees the positions up to
    its own; kv head i serves q heads ``i * group .. (i + 1) * group - 1`` (repeat_kv). A query
    before position 0 sees nothing and, like rows past ``query_start_loc[N]``, stays zero.
    An fp8 cache is read as ``fp8 * scale`` (``dequantize_kv``).
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
        keys = dequantize_kv(k_cache[blocks, pos % block_size], k_scale).repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        values = dequantize_kv(v_cache[blocks, pos % block_size], v_scale).repeat_interleave(group, dim=1)
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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """adp.varlen_attention: ``varlen_attention_fp32`` rounded once to q's dtype."""
    return varlen_attention_fp32(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                 scale, k_scale, v_scale).to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """adp.paged_decode_attention: q ``[B, q_heads, head_dim]``, one query per sequence at the
    last of its ``context_lens[b]`` positions, i.e. varlen attention with one query per sequence
    (a context of 0 gives zeros, as the kernel's empty range does). Split-K only changes the
    kernel's summation order, so ``num_splits`` has no counterpart here."""
    query_start_loc = torch.arange(q.shape[0] + 1, device=q.device)
    return varlen_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                            k_scale, v_scale)


# adp.sample_tokens (runtime/kernels/sample.py, whose docstring states the formula). The uint32
# arithmetic of the kernel is emulated on int64 tensors holding values in [0, 2**32): products
# are split so that nothing overflows, and every fp32 operation is the kernel's, in its order
# (the kernel is launched without FMA contraction), so this reproduces its tokens bit for bit.
_U32 = 0xFFFFFFFF


def _mul_u32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` in [0, 2**32): both partial products stay
    below 2**48."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _U32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash on uint32 values held in an int64 tensor."""
    x = x ^ (x >> 16)
    x = _mul_u32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_u32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seeds: torch.Tensor, counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit keys (int64 tensors) of each (seed, counter) pair, from all 64 bits of
    both."""
    seeds, counters = seeds.long(), counters.long()
    k0 = lowbias32((seeds & _U32) ^ 0x9E3779B9)
    k0 = lowbias32(k0 ^ ((seeds >> 32) & _U32))
    k0 = lowbias32(k0 ^ (counters & _U32))
    k0 = lowbias32(k0 ^ ((counters >> 32) & _U32))
    return k0, lowbias32(k0 ^ 0x85EBCA6B)


# Cephes' logf polynomial, coefficients rounded to fp32 (written out exactly).
_LOG_POLY = (0.07037683576345444, -0.11514610052108765, 0.11676998436450958, -0.12420140951871872,
             0.14249323308467865, -0.16668057441711426, 0.2000071406364441, -0.24999994039535522,
             0.3333333134651184)


def sample_log(x: torch.Tensor) -> torch.Tensor:
    """The sampler's natural log of positive normal fp32 values, with fp32 multiplies and adds
    only (so every device computes the same bits): ``x = m * 2**e`` with m in [sqrt(1/2),
    sqrt(2)), ``f = m - 1`` (exact), Cephes' ``log(1 + f)`` polynomial, ``e * ln 2`` in two
    parts. Within 1 ulp of the true log over the sampler's inputs."""
    bits = x.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # [1, 2)
    big = m > 1.4142135381698608  # fp32 sqrt(2)
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e).to(torch.float32)
    f = m - 1.0
    z = f * f
    y = torch.full_like(f, _LOG_POLY[0])
    for c in _LOG_POLY[1:]:
        y = y * f + c
    y = y * f * z
    y = y + e * -0.00021219444170128554
    y = y - z * 0.5
    return (f + y) + e * 0.693359375


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, n_cols: int) -> torch.Tensor:
    """fp32 ``[B, n_cols]``: the Gumbel noise ``adp.sample_tokens`` adds to column i of row r,
    a function of (seeds[r], counters[r], i) only."""
    k0, k1 = sample_keys(seeds, counters)
    cols = torch.arange(n_cols, dtype=torch.int64, device=seeds.device)
    h = lowbias32(lowbias32(cols[None, :] ^ k0[:, None]) ^ k1[:, None])
    u = ((h >> 9).to(torch.float32) + 0.5) * 2.0**-23  # exact, in (0, 1)
    return -sample_log(-sample_log(u))


def sample_scores(logits: torch.Tensor, inv_temperature: torch.Tensor, min_logit: torch.Tensor,
                  seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B, V]``: what adp.sample_tokens takes the argmax of. Greedy rows
    (``inv_temperature == 0``): the logits; other rows: ``logits * inv_temperature + gumbel``
    (each operation rounded to fp32), -inf where the logit is below ``min_logit``."""
    x = logits.float()
    scores = x * inv_temperature[:, None] + gumbel_noise(seeds, counters, x.shape[1])
    scores = torch.where(x < min_logit[:, None], float("-inf"), scores)
    return torch.where((inv_temperature == 0)[:, None], x, scores)


def sample_tokens(logits: torch.Tensor, inv_temperature: torch.Tensor, min_logit: torch.Tensor,
                  seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """adp.sample_tokens: int64 ``[B]``, the first index of each row's largest ``sample_scores``
    (a NaN wins, as in argmax): greedy rows give ``argmax(logits[r])``, the others a draw from
    ``softmax(logits[r] * inv_temperature[r])`` restricted to the logits not below
    ``min_logit[r]``, keyed by (``seeds[r]``, ``counters[r]``)."""
    return sample_scores(logits, inv_temperature, min_logit, seeds, counters).argmax(dim=-1)


def top_p_min_logit(logits: torch.Tensor, inv_temperature: torch.Tensor,
                    top_p: torch.Tensor) -> torch.Tensor:
    """adp.top_p_cut by sorting (a copy of ``runtime.sampling.top_p_min_logit``). fp32 ``[B]``:
    per row, the logit of the last token top-p keeps, sorting by probability under the row's
    temperature (the smallest prefix whose mass reaches ``top_p``; the first token always stays);
    -inf for greedy rows and ``top_p >= 1``. Tensor ops only: CUDA-graph safe."""
    x = logits.float()
    probs = torch.softmax(x * inv_temperature[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the mass ahead of each token
    kept = (before < top_p[:, None]).sum(dim=-1).clamp(min=1)
    cut = x.gather(-1, order.gather(-1, (kept - 1)[:, None])).squeeze(-1)
    return torch.where((inv_temperature > 0) & (top_p < 1), cut, float("-inf"))


def top_p_cut(logits: torch.Tensor, inv_temperature: torch.Tensor,
              top_p: torch.Tensor) -> torch.Tensor:
    """adp.top_p_cut: ``top_p_min_logit`` (whose softmax turns rows with a NaN or an infinite
    maximum into NaNs), with the kernel's answer on those rows when they are cut: -inf for a row
    holding a NaN or only -inf, +inf for a row whose maximum is +inf."""
    cut = top_p_min_logit(logits, inv_temperature, top_p)
    x = logits.float()
    top = x.max(dim=-1).values
    has_nan = x.isnan().any(dim=-1)
    cuts = (inv_temperature > 0) & (top_p < 1)
    cut = torch.where(cuts & ~has_nan & (top == float("inf")), float("inf"), cut)
    return torch.where(cuts & (has_nan | (top == float("-inf"))), float("-inf"), cut)
