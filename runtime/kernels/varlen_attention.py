"""Variable-length (packed) causal attention over the paged KV cache: ``torch.ops.adp.varlen_attention``.

Registered on import. One call serves any mix of decode rows (one new token), whole prompts and
later chunks of a prompt (whose earlier chunks are already cached), packed without padding:
sequence ``n`` owns q tokens ``query_start_loc[n] .. query_start_loc[n+1] - 1`` and attends over
cache positions ``0 .. context_lens[n] - 1`` (its new tokens included: reshape_and_cache wrote them
before the call), query ``j`` at position ``context_lens[n] - q_len + j`` seeing positions up to its
own. Cache layout as in paged_attention.py: ``[num_blocks, block_size, kv_heads, head_dim]``.
Design (tiling, grid, numerics): docs/kernels.md, "Variable-length attention".
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from .paged_attention import (
    _FLOAT_DTYPES,
    _INDEX_DTYPES,
    _INT32_MAX,
    _INTERPRETED,
    _LOG2E,
    _MIN_DOT_DIM,
    _cache_needs_int64,
    _check_cache,
    _device_guard,
    _FP8,
    _max_offset,
    _scale_args,
    check_kv_scales,
    load_kv_as,
    online_softmax_step,
    scores,
)
from .utils import eager_on_cpu

# --- launch configuration, chosen per call in Python (no autotuning: the op runs in CUDA graphs) ---
# Keyed by head_dim rounded up to a power of two; for 16-bit caches (fp32 halves block_m/block_n).
# Two launches of one kernel split the sequences by query length, so neither pays for the other:
#   packed   sequences with more queries than a short tile holds: tiles of block_m rows, each row
#            one (query token, q head of the kv head's group); block_n KV tokens per iteration
#   short    sequences whose queries fit one tile of max(16, next_power_of_2(group)) rows (16 is
#            tl.dot's minimum): 16 queries at group 1, 4 at group 4, 1 from group 9 (decode rows).
#            One program per (sequence, kv head), like the paged decode kernel; short_block_n KV
#            tokens per iteration. short=False sends every sequence to the packed launch.
VARLEN_CONFIGS = {
    64: dict(block_m=128, block_n=64, num_warps=4, num_stages=3,
             short=True, short_block_n=64, short_num_warps=4, short_num_stages=3),
    128: dict(block_m=128, block_n=128, num_warps=8, num_stages=2,  # tuned on H200 (bench --sweep)
              short=True, short_block_n=64, short_num_warps=4, short_num_stages=3),
    256: dict(block_m=64, block_n=32, num_warps=8, num_stages=2,
              short=True, short_block_n=32, short_num_warps=4, short_num_stages=2),
}  # fmt: skip


# Sequences whose query starts one vector load of the packed launch's tile lookup covers.
_MAX_SEARCH_CHUNK = 1024
# The smallest tile lookup: batches up to 63 sequences share one compiled variant.
_MIN_SEARCH_CHUNK = 64


def _search_chunk(num_seqs: int) -> int:
    return min(max(triton.next_power_of_2(num_seqs + 1), _MIN_SEARCH_CHUNK), _MAX_SEARCH_CHUNK)


# Sizes that change from call to call are not specialised on (Triton would otherwise compile a
# variant per divisibility-by-16 / equals-1 pattern of them: on the H200 a mixed workload spent
# seconds compiling in its first prefill calls).
@triton.jit(do_not_specialize=["stride_btb", "num_seqs", "num_tokens", "max_tokens", "short_max"])
def _varlen_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, context_lens_ptr, out_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb, stride_btn, stride_qsl, stride_cl,
    stride_ot, stride_oh, stride_od,
    qk_scale_log2, num_seqs, num_tokens, max_tokens, k_scale_ptr, v_scale_ptr, short_max,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    NUM_STAGES: tl.constexpr, PACKED: tl.constexpr, SEARCH_CHUNK: tl.constexpr,
    NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, IDX64: tl.constexpr,
    KV_FP8: tl.constexpr = False, EXACT_BITS: tl.constexpr = False,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    if PACKED:
        # Tile mapping without a host-side prefix sum: sequence n owns program ids
        # first_tile(n) = query_start[n] // BLOCK_Q + n .. first_tile(n + 1) - 1, at least
        # cdiv(q_len, BLOCK_Q) of them. Index num_seqs is a pseudo-sequence over the rows past
        # query_start[num_seqs] (batch padding) that writes zeros. A program's sequence is the last
        # n in [0, num_seqs] with first_tile(n) <= pid, i.e. (count of such n) - 1: counted over
        # vector loads of query_start (one for up to SEARCH_CHUNK sequences) rather than a binary
        # search, whose chain of dependent scalar loads cost every program microseconds.
        hits = tl.zeros([SEARCH_CHUNK], dtype=tl.int32)
        for chunk in tl.range(0, num_seqs + 1, SEARCH_CHUNK):
            idx = chunk + tl.arange(0, SEARCH_CHUNK)
            in_range = idx <= num_seqs
            first = tl.load(query_start_ptr + idx * stride_qsl, mask=in_range, other=0) // BLOCK_Q + idx
            hits += ((first <= pid) & in_range).to(tl.int32)
        seq = tl.maximum(tl.sum(hits, 0) - 1, 0)
        is_real = seq < num_seqs
        q_start = tl.load(query_start_ptr + seq * stride_qsl)
        q_end = tl.load(query_start_ptr + (seq + 1) * stride_qsl, mask=is_real, other=num_tokens)
        # The pseudo-sequence has no context: its rows see nothing and come out as zeros.
        ctx = tl.load(context_lens_ptr + seq * stride_cl, mask=is_real, other=0)
        q_len = q_end - q_start
        if is_real & (q_len <= short_max):
            return  # left to the short launch (or q_len 0)
        num_q_tiles = tl.cdiv(q_len, BLOCK_Q)
        local = pid - (q_start // BLOCK_Q + seq)
        if (local < 0) | (local >= num_q_tiles):
            return  # spare id of this sequence's range (or ids before a non-zero query_start[0])
        # Later tiles attend over more keys: give them the lower ids, which start first.
        tile = num_q_tiles - 1 - local
    else:
        seq = pid
        q_start = tl.load(query_start_ptr + seq * stride_qsl)
        q_len = tl.load(query_start_ptr + (seq + 1) * stride_qsl) - q_start
        if (q_len == 0) | (q_len > BLOCK_Q):
            return  # nothing to do, or the packed launch's
        ctx = tl.load(context_lens_ptr + seq * stride_cl)
        tile = 0

    # Clamp to the table's capacity so a context_len beyond it cannot read out of bounds.
    ctx = tl.maximum(tl.minimum(ctx, max_tokens), 0).to(tl.int32)
    q_len = q_len.to(tl.int32)

    # Row r of the tile: query token r // GROUP of the tile, q head r % GROUP of this kv head's
    # group (HF repeat_kv order), so every K/V tile is loaded once for all heads of the group.
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    q_idx = tile * BLOCK_Q + r // GROUP
    row_valid = (r // GROUP < BLOCK_Q) & (q_idx < q_len)
    head = kvh * GROUP + r % GROUP
    token = q_start + q_idx
    q_pos = ctx - q_len + q_idx  # cache position of each row's query

    q_mask = row_valid[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    if not NATIVE_DOT:
        q = q.to(tl.float32)
    if KV_FP8:
        # k_scale folded into the softmax scale, v_scale into the output (paged_attention.py).
        qk_scale_log2 = qk_scale_log2 * tl.load(k_scale_ptr)

    # KV range of the tile: keys below the first query's position need no causal mask; the rest
    # (the diagonal band) do. Both ends are <= ctx, so no key past the context is ever read.
    first_pos = ctx - q_len + tile * BLOCK_Q
    last_pos = ctx - q_len + tl.minimum((tile + 1) * BLOCK_Q, q_len) - 1
    kv_end = tl.maximum(last_pos + 1, 0)
    full_end = tl.maximum(first_pos + 1, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_btb
    head_off = kvh * stride_ch
    n = tl.arange(0, BLOCK_N)

    for start in tl.range(0, full_end, BLOCK_N, num_stages=NUM_STAGES):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start + n, kv_end, q_pos, table, k_cache_ptr, v_cache_ptr, head_off,
            d, d_mask, stride_btn, stride_cb, stride_cs, stride_cd, qk_scale_log2,
            False, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, NATIVE_DOT, DOT_PRECISION, IDX64, KV_FP8,
        )
    for start in tl.range(full_end, kv_end, BLOCK_N, num_stages=NUM_STAGES):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start + n, kv_end, q_pos, table, k_cache_ptr, v_cache_ptr, head_off,
            d, d_mask, stride_btn, stride_cb, stride_cs, stride_cd, qk_scale_log2,
            True, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, NATIVE_DOT, DOT_PRECISION, IDX64, KV_FP8,
        )

    # A row that saw no key (padding rows, or a query before position 0) gets zeros, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if KV_FP8:
        out = out * tl.load(v_scale_ptr)
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, kv_pos, kv_end, q_pos, table, k_cache_ptr, v_cache_ptr, head_off,
    d, d_mask, stride_btn, stride_cb, stride_cs, stride_cd, qk_scale_log2,
    CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, IDX64: tl.constexpr, KV_FP8: tl.constexpr,
):
    """One online-softmax step over the KV tokens ``kv_pos`` (base 2, fp32 state)."""
    # Only the diagonal band can reach past kv_end; the tiles below it are whole, so their loads
    # carry no predicate (unless head_dim is padded).
    if CAUSAL:
        kv_valid = kv_pos < kv_end
    else:
        kv_valid = tl.full(kv_pos.shape, True, tl.int1)
    # The block id of every token is gathered from the table (repeats hit L1), so a tile may span
    # several KV blocks or part of one.
    if CAUSAL:
        phys = tl.load(table + (kv_pos // BLOCK_SIZE) * stride_btn, mask=kv_valid, other=0)
    else:
        phys = tl.load(table + (kv_pos // BLOCK_SIZE) * stride_btn)
    if IDX64:
        phys = phys.to(tl.int64)
    else:
        phys = phys.to(tl.int32)
    kv_off = (phys * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs + head_off)[:, None] + d[None, :] * stride_cd
    if HEAD_DIM != HEAD_DIM_PAD:
        k = tl.load(k_cache_ptr + kv_off, mask=kv_valid[:, None] & d_mask[None, :], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_valid[:, None] & d_mask[None, :], other=0.0)
    elif CAUSAL:
        k = tl.load(k_cache_ptr + kv_off, mask=kv_valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_valid[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_off)
        v = tl.load(v_cache_ptr + kv_off)
    if KV_FP8:
        k = load_kv_as(k, q, NATIVE_DOT)
        v = load_kv_as(v, q, NATIVE_DOT)
    s = scores(q, k, NATIVE_DOT, DOT_PRECISION) * qk_scale_log2
    if CAUSAL:
        # Rows past the sequence's queries have q_pos >= kv_end, so kv_valid needs no extra term
        # for the rows that are stored.
        s = tl.where(kv_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    # A row with no visible key yet (a query before position 0) keeps m = -inf: guarded.
    return online_softmax_step(s, v, m_i, l_i, acc, NATIVE_DOT, DOT_PRECISION, True)


def varlen_config(q: torch.Tensor, k_cache: torch.Tensor) -> dict:
    """The launch config the op uses for these shapes (VARLEN_CONFIGS by head_dim)."""
    head_dim_pad = triton.next_power_of_2(k_cache.shape[3])
    cfg = dict(VARLEN_CONFIGS.get(head_dim_pad) or VARLEN_CONFIGS[max(VARLEN_CONFIGS)])
    if k_cache.dtype == torch.float32:  # twice the bytes per element: halve the tiles
        for key in ("block_m", "block_n", "short_block_n"):
            cfg[key] = max(_MIN_DOT_DIM, cfg[key] // 2)
    return cfg


def varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    short: bool,
    short_block_n: int = 64,
    short_num_warps: int = 4,
    short_num_stages: int = 3,
    native_dot: bool = True,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel with an explicit config (the op passes ``varlen_config``'s).

    An fp8 cache is read as ``fp8 * k_scale`` / ``fp8 * v_scale``. Inputs are checked by the op;
    tests and the benchmark call this directly.
    """
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_tokens, num_q_heads, _ = q.shape
    num_seqs = context_lens.shape[0]
    group = num_q_heads // num_kv_heads
    for tile in (block_m, block_n, short_block_n):
        assert tile >= _MIN_DOT_DIM and tile & (tile - 1) == 0, f"tiles must be powers of two >= 16, got {tile}"
    assert block_m >= group, f"block_m {block_m} smaller than the q-head group {group}"
    out = q.new_empty(q.shape)
    if num_tokens == 0:
        return out
    max_tokens = block_tables.shape[1] * block_size
    for t in (q, out, block_tables, query_start_loc, context_lens):
        assert _max_offset(t) <= _INT32_MAX, f"tensor of shape {tuple(t.shape)} too large for int32 indexing"
    assert max_tokens <= _INT32_MAX, "block table too large for int32 indexing"
    # The interpreter multiplies bf16 dot operands as raw bits (triton 3.x): fp32 operands there.
    native = native_dot and q.dtype != torch.float32 and not (_INTERPRETED and q.dtype == torch.bfloat16)
    common = dict(
        GROUP=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        NATIVE_DOT=native,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact
        IDX64=_cache_needs_int64(k_cache),
    )
    k_scale_ptr, v_scale_ptr, fp8_meta = _scale_args(k_cache, k_scale, v_scale)
    common.update(fp8_meta)
    args = (
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        *q.stride(), *k_cache.stride(), *block_tables.stride(),
        query_start_loc.stride(0), context_lens.stride(0), *out.stride(),
        scale * _LOG2E, num_seqs, num_tokens, max_tokens, k_scale_ptr, v_scale_ptr,
    )  # fmt: skip
    # The short launch's tile is the smallest tl.dot takes; it holds this many query tokens.
    short_block_m = max(_MIN_DOT_DIM, triton.next_power_of_2(group))
    short_max = short_block_m // group if short and num_seqs > 0 else 0
    packed_block_q = block_m // group
    with _device_guard(q):
        if short_max:
            _varlen_attention_kernel[(num_seqs, num_kv_heads)](
                *args, 0,
                BLOCK_M=short_block_m, BLOCK_Q=short_max, BLOCK_N=short_block_n, NUM_STAGES=short_num_stages,
                PACKED=False, SEARCH_CHUNK=1, num_warps=short_num_warps, **common,
            )  # fmt: skip
        # Grid from static shapes only (no host sync, fixed under CUDA graphs): every sequence's
        # range of ids plus the padding pseudo-sequence fit in num_tokens // BLOCK_Q + num_seqs + 1.
        packed_programs = num_tokens // packed_block_q + num_seqs + 1
        _varlen_attention_kernel[(packed_programs, num_kv_heads)](
            *args, short_max,
            BLOCK_M=block_m, BLOCK_Q=packed_block_q, BLOCK_N=block_n, NUM_STAGES=num_stages,
            PACKED=True, SEARCH_CHUNK=_search_chunk(num_seqs),
            num_warps=num_warps, **common,
        )  # fmt: skip
    return out


@torch.library.custom_op("adp::varlen_attention", mutates_args=())
def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention of packed variable-length queries over a paged KV cache (GQA).

    q ``[T, q_heads, head_dim]`` (any strides); caches ``[num_blocks, block_size, kv_heads,
    head_dim]``; block_tables int ``[N, max_blocks]``; query_start_loc int ``[N + 1]``,
    non-decreasing from 0 (sequence n's queries are q rows ``query_start_loc[n] ..
    query_start_loc[n+1] - 1``); context_lens int ``[N]``, each >= that sequence's query count
    (cached tokens including the new ones). Returns a new contiguous ``[T, q_heads, head_dim]``;
    rows past ``query_start_loc[N]`` (batch padding) are zeros. An fp8 cache (float8_e4m3fn) is
    read as ``fp8 * k_scale`` / ``fp8 * v_scale`` (fp32 one-element tensors).
    """
    _check_cache(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    assert q.dim() == 3 and q.shape[2] == head_dim, f"q {tuple(q.shape)} vs cache head_dim {head_dim}"
    num_q_heads = q.shape[1]
    assert num_q_heads % num_kv_heads == 0, f"q heads {num_q_heads} not a multiple of kv heads {num_kv_heads}"
    assert q.dtype in _FLOAT_DTYPES and (q.dtype == k_cache.dtype or k_cache.dtype == _FP8), (
        f"q dtype {q.dtype} != cache dtype {k_cache.dtype}"
    )
    check_kv_scales(k_cache, k_scale, v_scale)
    num_seqs = context_lens.shape[0]
    assert context_lens.dim() == 1 and context_lens.dtype in _INDEX_DTYPES, (
        f"context_lens must be int [N], got {context_lens.dtype} {tuple(context_lens.shape)}"
    )
    assert query_start_loc.shape == (num_seqs + 1,) and query_start_loc.dtype in _INDEX_DTYPES, (
        f"query_start_loc must be int [N+1={num_seqs + 1}], got {query_start_loc.dtype} {tuple(query_start_loc.shape)}"
    )
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.dtype in _INDEX_DTYPES, (
        f"block_tables must be int [N={num_seqs}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}"
    )
    assert q.device == k_cache.device == block_tables.device == query_start_loc.device == context_lens.device, (
        "tensors on different devices"
    )
    if eager_on_cpu(_varlen_attention_kernel, q, k_cache):
        return reference.varlen_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                                          k_scale, v_scale)
    return varlen(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                  **varlen_config(q, k_cache), k_scale=k_scale, v_scale=v_scale)  # fmt: skip


@varlen_attention.register_fake
def _(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, k_scale=None,
      v_scale=None) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, like the real output
