"""Tests for adp::varlen_attention (packed variable-length attention over the paged KV cache).

On CPU the Triton kernel runs under the interpreter, which costs ~10 ms per program: shapes are
small (head_dim 32 mostly) and explicit small tiles make short sequences span several q and KV
tiles. The reference is kernel_reference.varlen_attention_ref (fp32, one sequence at a time).
"""


import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import adp_pass.runtime.kernels.cached_attention  # noqa: F401  (registers adp.cached_attention)
import adp_pass.runtime.kernels.varlen_attention as va  # (registers adp.varlen_attention)
from kernel_reference import poisoned_paged_cache, varlen_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol) against the fp32 reference computed from the same inputs: fp32 differs only in
# summation order; bf16/fp16 by the output rounding plus, on GPU, P rounded to the dtype for p @ v.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# Small tiles so that the test sequences (< 100 queries, < 130 keys) cross tile boundaries:
# block_m 32 holds 8 queries at group 4 (32 at group 1); block_n 16 is one KV block of 16 or half of 32.
SMALL_TILES = dict(block_m=32, block_n=16, num_warps=4, num_stages=2, short=True, short_block_n=16,
                   short_num_warps=4, short_num_stages=1)  # fmt: skip


def make_case(q_lens, context_lens, *, block_size=16, kv_heads=2, group=4, head_dim=32, dtype=torch.float32,
              pad_tokens=0, seed=0):  # fmt: skip
    """Inputs for one call: caches full of NaN except each sequence's visible tokens, shuffled
    block tables with a spare column, so a read past a context (or a wrong block) poisons the
    output; ``pad_tokens`` extra q rows past the last sequence (batch padding)."""
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_tables = poisoned_paged_cache(context_lens, block_size, kv_heads,
                                                          head_dim, dtype, gen, spare_blocks=3)
    q = torch.randn(sum(q_lens) + pad_tokens, kv_heads * group, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, block_tables, query_start_loc, lens)]


def check(q_lens, context_lens, config=None, **case):
    """The op (or, with ``config``, the kernel launched with that config) against the reference."""
    q, k_cache, v_cache, block_tables, query_start_loc, lens = make_case(q_lens, context_lens, **case)
    scale = q.shape[-1] ** -0.5
    if config is None:
        out = torch.ops.adp.varlen_attention(q, k_cache, v_cache, block_tables, query_start_loc, lens, scale)
    else:
        out = va.varlen(q, k_cache, v_cache, block_tables, query_start_loc, lens, scale, **config)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    ref = varlen_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, lens, scale)
    atol, rtol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    return out


# --- the three kinds of sequence, alone and mixed ----------------------------------
@pytest.mark.parametrize("group", [1, 4])
def test_decode_rows(group):
    # One query per sequence at the end of its context (the short launch); contexts end mid-block.
    check([1, 1, 1, 1], [1, 7, 33, 100], group=group)


@pytest.mark.parametrize("group", [1, 4])
def test_whole_prompts_of_different_lengths(group):
    # q_len == context_len: plain causal self-attention of each prompt, several q and KV tiles each
    # (block_m 32: 8 queries per tile at group 4, 32 at group 1).
    check([5, 37, 70, 17], [5, 37, 70, 17], config=SMALL_TILES, group=group)


@pytest.mark.parametrize("block_size", [16, 32])
def test_chunk_after_earlier_chunks(block_size):
    # Chunk of 24 queries at positions 56..79: its keys span 5 (or 3) blocks, the first 56 of them
    # from earlier chunks; the q tiles start mid-KV-tile, so both KV loops run.
    check([24], [80], config=SMALL_TILES, block_size=block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_mixed_batch(group, dtype):
    # Decode rows, whole prompts, later chunks and q_len-0 rows in one call, plus padding rows.
    # The short launch holds up to 4 queries at group 4 and 16 at group 1: q_len 4 and 16 are
    # the largest it takes, 5 and 17 go to the packed launch.
    q_lens = [1, 40, 0, 24, 1, 4, 5, 16, 17, 0]
    context_lens = [9, 40, 5, 80, 100, 20, 5, 16, 30, 0]
    out = check(q_lens, context_lens, config=SMALL_TILES, group=group, dtype=dtype, pad_tokens=3)
    assert torch.equal(out[-3:].cpu(), torch.zeros_like(out[-3:].cpu())), "padding rows must be zeros"


def test_mixed_batch_with_default_config():
    # The op's own config (VARLEN_CONFIGS: bigger tiles, fp32 halves them) on the same mix.
    check([1, 40, 0, 24, 1, 3, 9], [9, 40, 5, 80, 100, 20, 9], pad_tokens=2)


def test_packed_launch_only(monkeypatch):
    # short=False: decode rows and the padding tail go through the packed tile mapping as well;
    # the tile lookup reads query_start_loc 4 entries at a time, so it takes two vector loads.
    monkeypatch.setattr(va, "_MAX_SEARCH_CHUNK", 4)
    config = dict(SMALL_TILES, short=False)
    check([1, 40, 0, 24, 1], [9, 40, 5, 80, 100], config=config, pad_tokens=5)


def test_fp16_native_dots():
    # fp16 runs the 16-bit dots (P rounded to fp16) under the interpreter too; bf16 cannot.
    check([1, 30, 12], [50, 30, 60], config=SMALL_TILES, dtype=torch.float16, head_dim=64)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_qwen_head_dims(head_dim):
    check([2, 20, 1], [2, 45, 17], config=SMALL_TILES, head_dim=head_dim)


def test_non_power_of_two_head_dim_and_group():
    # head_dim 48 is padded to 64 and masked; a group of 3 does not divide the 32-row tile
    # (10 queries x 3 heads, 2 rows unused) and the short launch holds 5 queries.
    check([1, 5, 33], [20, 5, 50], config=SMALL_TILES, kv_heads=1, group=3, head_dim=48)


def test_all_sequences_empty_and_padding():
    # No query at all (q_len 0 everywhere) but padding rows: all zeros, no NaN from the NaN cache.
    out = check([0, 0], [16, 3], config=SMALL_TILES, pad_tokens=4)
    assert not out.any()


@pytest.mark.parametrize("short", [True, False])
def test_queries_before_position_zero_give_zeros(short):
    # context_len < q_len (e.g. a padding sequence with context 0): a query whose position falls
    # before 0 sees no key and must come out as zeros, not NaN; the others attend normally.
    q, k_cache, v_cache, block_tables, query_start_loc, lens = make_case([3, 2, 1], [1, 0, 0])
    out = va.varlen(q, k_cache, v_cache, block_tables, query_start_loc, lens, 0.2, **dict(SMALL_TILES, short=short))
    expected = torch.zeros_like(out)
    expected[2] = v_cache[block_tables[0, 0], 0].repeat_interleave(4, dim=0)  # query at 0 sees key 0 only
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_int64_cache_offsets(monkeypatch):
    # Caches past 2^31 elements switch the gathered row offsets to int64; same results.
    monkeypatch.setattr(va, "_cache_needs_int64", lambda k_cache: True)
    check([1, 20], [30, 20], config=SMALL_TILES)


# --- layouts ----------------------------------------------------------------------
def test_non_contiguous_q_and_int64_metadata():
    # q as the q columns of a fused q|k|v projection output [T, (Hq + 2 Hkv) * D] viewed as
    # [T, Hq, D]; caches as views of one [2, ...] tensor; int64 tables and lengths.
    q, k_cache, v_cache, block_tables, query_start_loc, lens = make_case([1, 30, 12], [50, 30, 60])
    tokens, q_heads, head_dim = q.shape
    qkv = torch.randn(tokens, (q_heads + 2 * 2) * head_dim, device=DEVICE)
    qkv[:, : q_heads * head_dim] = q.reshape(tokens, -1)
    q_view = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    assert not q_view.is_contiguous()
    kv = torch.stack([k_cache, v_cache])
    args = (kv[0], kv[1], block_tables.long(), query_start_loc.long(), lens.long(), 0.2)
    out = va.varlen(q_view, *args, **SMALL_TILES)
    ref = varlen_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, lens, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- agreement with the existing paths of adp.cached_attention --------------------
def _cached_attention_step(prompt_len, context_lens, new_kv_seed=1, **case):
    """Run adp.cached_attention (writing each sequence's new k/v at its last prompt_len positions)
    and return its output plus the inputs varlen_attention needs afterwards."""
    batch = len(context_lens)
    q_lens = [prompt_len] * batch
    q, k_cache, v_cache, block_tables, query_start_loc, lens = make_case(q_lens, context_lens, **case)
    tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    gen = torch.Generator().manual_seed(new_kv_seed)
    k_new = torch.randn(batch, kv_heads, prompt_len, head_dim, generator=gen).to(q.dtype).to(DEVICE)
    v_new = torch.randn(batch, kv_heads, prompt_len, head_dim, generator=gen).to(q.dtype).to(DEVICE)
    block_size = k_cache.shape[1]
    slots = []
    for b, ctx in enumerate(context_lens):
        pos = torch.arange(ctx - prompt_len, ctx)
        slots.append(block_tables[b].long().cpu()[pos // block_size] * block_size + pos % block_size)
    slot_mapping = torch.cat(slots).to(DEVICE)
    q_bhsd = q.view(batch, prompt_len, q_heads, head_dim).transpose(1, 2)
    out = torch.ops.adp.cached_attention(q_bhsd, k_new, v_new, k_cache, v_cache, slot_mapping, block_tables, lens,
                                         head_dim**-0.5)  # fmt: skip
    varlen_args = (q, k_cache, v_cache, block_tables, query_start_loc, lens, head_dim**-0.5)
    return out.transpose(1, 2).reshape(tokens, q_heads, head_dim), varlen_args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_cached_attention_decode(dtype):
    # Decode-only input: adp.cached_attention (S == 1, the paged decode kernel) and this op on the
    # cache it has just written.
    decode_out, args = _cached_attention_step(1, [1, 7, 33, 100], dtype=dtype)
    out = torch.ops.adp.varlen_attention(*args)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), decode_out.float(), atol=atol, rtol=rtol)


def test_matches_cached_attention_prefill():
    # Whole prompts of one length (what the prefill path accepts): SDPA over the new tokens.
    prefill_out, args = _cached_attention_step(21, [21, 21, 21])
    out = va.varlen(*args, **SMALL_TILES)
    torch.testing.assert_close(out, prefill_out, atol=1e-5, rtol=1e-5)


# --- op plumbing --------------------------------------------------------------------
def test_config_table_covers_head_dims():
    q = torch.zeros(2, 4, 128)
    for head_dim, dtype in [(32, torch.bfloat16), (96, torch.float16), (128, torch.float32), (512, torch.bfloat16)]:
        cfg = va.varlen_config(q, torch.zeros(1, 16, 2, head_dim, dtype=dtype))
        assert min(cfg["block_m"], cfg["block_n"], cfg["short_block_n"]) >= 16
        assert cfg.keys() == va.VARLEN_CONFIGS[128].keys()


def test_rejects_bad_inputs():
    q, k_cache, v_cache, block_tables, query_start_loc, lens = make_case([1, 2], [3, 4])
    with pytest.raises(AssertionError, match="multiple of kv heads"):
        torch.ops.adp.varlen_attention(q[:, :3], k_cache, v_cache, block_tables, query_start_loc, lens, 0.1)
    with pytest.raises(AssertionError, match="query_start_loc"):
        torch.ops.adp.varlen_attention(q, k_cache, v_cache, block_tables, query_start_loc[1:], lens, 0.1)


def _step(q, k_cache, v_cache, block_tables, query_start_loc, lens):
    return torch.ops.adp.varlen_attention(q, k_cache, v_cache, block_tables, query_start_loc, lens, 0.25) * 2


def test_tracing_and_opcheck():
    inputs = make_case([1, 3], [5, 3], head_dim=16)
    gm = make_fx(_step, tracing_mode="fake")(*inputs)
    assert torch.ops.adp.varlen_attention.default in {n.target for n in gm.graph.nodes}
    compiled = torch.compile(_step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), _step(*inputs), atol=1e-6, rtol=1e-6)
    torch.library.opcheck(torch.ops.adp.varlen_attention.default, (*inputs, 0.25))
