"""Attention over a paged KV cache for a whole layer step: ``torch.ops.adp.cached_attention``.

Registered on import. It writes the step's new k/v tokens into the layer's paged cache
(``adp.reshape_and_cache``; decode has the decode kernel write them) and then attends:

* ``S == 1`` (decode): ``adp.cache_and_paged_decode``, i.e. the write and then
  ``adp.paged_decode_attention`` over each sequence's whole cached context, ``context_lens[b]``
  tokens including the one just written, in one kernel launch unless the decode is split.
* ``S > 1`` (prefill): causal SDPA over the step's own q/k/v. Only *new* sequences may be
  prefilled: every sequence of the batch has exactly S tokens and no earlier context
  (``context_lens == S``).
* ``query_start_loc`` given (packed): ``B == 1`` and the ``S`` tokens are several sequences'
  queries back to back, sequence n's from ``query_start_loc[n]`` to ``query_start_loc[n+1]``,
  attending to its first ``context_lens[n]`` cached tokens (``adp.varlen_attention``): whole
  prompts, later chunks of a prompt and decode rows in one call.

The branch is chosen from the static shape S and whether ``query_start_loc`` is passed, never
from tensor values, so a captured CUDA graph always takes the same path. See
docs/cache_insertion.md.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from . import paged_attention  # noqa: F401  (registers adp.reshape_and_cache / cache_and_paged_decode)
from . import varlen_attention  # noqa: F401  (registers adp.varlen_attention)


def _check_prefill_is_new(context_lens: torch.Tensor, seq: int) -> None:
    if context_lens.is_cuda:
        # A host check would sync every layer; a device-side assert does not, but it may not be
        # recorded into a CUDA graph.
        if not torch.cuda.is_current_stream_capturing():
            message = "adp.cached_attention: prefill needs context_lens == S"
            torch._assert_async(torch.all(context_lens == seq), message)
    elif not bool(torch.all(context_lens == seq)):
        raise ValueError(
            f"cached_attention prefills new sequences only (context_lens == S == {seq}), got "
            f"context_lens={context_lens.tolist()}; chunked prefill / prefix reuse is not supported"
        )


@torch.library.custom_op("adp::cached_attention", mutates_args=("k_cache", "v_cache"))
def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    query_start_loc: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cache this step's k/v and attend; returns ``[B, Hq, S, D]`` stored as ``[B, S, Hq, D]``.

    q ``[B, Hq, S, D]``; k, v ``[B, Hkv, S, D]`` (before GQA's repeat); caches
    ``[num_blocks, block_size, Hkv, D]``; slot_mapping int ``[B*S]`` (token ``b*S + s``, -1 skips
    it); block_tables int32 ``[B, max_blocks]``; context_lens int32 ``[B]``. Packed
    (``query_start_loc`` int32 ``[N+1]``): ``B == 1``, block_tables ``[N, max_blocks]`` and
    context_lens ``[N]`` per sequence. An fp8 cache (float8_e4m3fn) takes its layer's fp32
    one-element ``k_scale`` / ``v_scale``: written as ``e4m3(clamp(x / scale))``, read as
    ``fp8 * scale``. The padded prefill attends over the step's own k/v, unquantized (as it does
    not read the cache).
    """
    batch, q_heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    assert k.shape == v.shape == (batch, kv_heads, seq, head_dim), (
        f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}"
    )
    assert q_heads % kv_heads == 0, f"q heads {q_heads} not a multiple of kv heads {kv_heads}"
    # Token-major rows, in the order slot_mapping lists them (b * S + s).
    key = k.transpose(1, 2).reshape(batch * seq, kv_heads, head_dim)
    value = v.transpose(1, 2).reshape(batch * seq, kv_heads, head_dim)
    if query_start_loc is None and seq == 1:
        # Decode: the decode kernel writes the new token itself (one launch, not two).
        out = torch.ops.adp.cache_and_paged_decode(
            q[:, :, 0], key, value, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale,
            0, k_scale, v_scale,
        )
        return out.view(batch, 1, q_heads, head_dim).transpose(1, 2)
    torch.ops.adp.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    if query_start_loc is not None:
        assert batch == 1, f"a packed call has one row of tokens, got {batch}"
        out = torch.ops.adp.varlen_attention(q[0].transpose(0, 1), k_cache, v_cache,
                                             block_tables, query_start_loc, context_lens, scale,
                                             k_scale, v_scale)
        return out.view(1, seq, q_heads, head_dim).transpose(1, 2)

    _check_prefill_is_new(context_lens, seq)
    group = q_heads // kv_heads
    if group > 1:
        # transformers' repeat_kv order. Explicit rather than enable_gqa, which CUDA's
        # memory-efficient backend lacks (fp32 would fall back to the math kernel).
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    # No copy when SDPA already returned the [B, S, H, D] layout (flash kernels do).
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale,
      query_start_loc=None, k_scale=None, v_scale=None) -> torch.Tensor:
    # [B, Hq, S, D] stored as [B, S, Hq, D], like the real op and like SDPA's flash kernels: the
    # captured graph views the output's transpose(1, 2) as [B, S, Hq*D] without a copy.
    batch, q_heads, seq, head_dim = q.shape
    return q.new_empty((batch, seq, q_heads, head_dim)).transpose(1, 2)
