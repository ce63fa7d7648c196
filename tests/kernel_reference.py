"""Eager references for the adp Triton kernels.

The op references live in the runtime, ``adp_pass.runtime.kernels.reference`` (the ops fall back
to them for CPU tensors when Triton compiles); they are re-exported here under the names the
tests and bench/bench_kernels.py use. The norm/SiLU/RoPE ones are copied from transformers' Qwen3
modeling code (transformers/models/qwen3/modeling_qwen3.py, 5.x); tests/test_kernels.py checks
them, and ``rotary_cos_sin_ref`` below (Qwen3RotaryEmbedding, needed by tests only), against the
installed transformers so drift is caught.
"""

import torch

from adp_pass.runtime.kernels.reference import (  # noqa: F401  (re-exported)
    add_rms_norm as add_rms_norm_ref,
    apply_rotary_pos_emb,
    qk_norm_rope as qk_norm_rope_ref,
    rms_norm as rms_norm_ref,
    rotate_half,
    silu_mul as silu_mul_ref,
    silu_mul_fused as silu_mul_fused_ref,
    varlen_attention_fp32 as varlen_attention_ref,
)


def rotary_cos_sin_ref(
    positions: torch.Tensor, head_dim: int, rope_theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3RotaryEmbedding (default rope, attention_scaling 1.0) for 1-D ``positions``."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


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


def run_op_case(op: str, args: tuple) -> tuple[tuple, tuple]:
    """Run ``torch.ops.adp.<op>(*args)`` on copies of the paged caches; returns (outputs,
    caches written). tests/test_kernels.py runs the same case here and in a fresh process."""
    args = tuple(a.clone() if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
    out = getattr(torch.ops.adp, op)(*args)
    if op == "reshape_and_cache":
        return (), (args[2], args[3])
    if op == "cached_attention":
        return (out,), (args[3], args[4])
    return (out if isinstance(out, tuple) else (out,)), ()
