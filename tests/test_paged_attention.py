"""Tests for adp::reshape_and_cache and adp::paged_decode_attention.

On CPU the Triton kernels run under the interpreter, which is slow: shapes are small.
"""


import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import adp_pass.runtime.kernels.paged_attention as pa  # registers torch.ops.adp.*
from adp_pass.runtime.kv_cache import PagedKVCache
from kernel_reference import poisoned_paged_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONTEXT_LENS = [1, 7, 33, 100]
# (atol, rtol) against an fp32 reference computed from the same low-precision inputs:
# fp32 is exact up to summation order; 16-bit outputs differ by the final rounding
# (half an ulp: 2^-11 fp16, 2^-8 bf16) plus tf32 rounding of P on GPU.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}


# --- references -------------------------------------------------------------------
# Adapted from vLLM tests/kernels/attention/test_attention.py (ref_masked_attention,
# ref_single_query_cached_kv_attention): cache layout changed to
# [num_blocks, block_size, kv_heads, head_dim], everything computed in fp32.
def ref_masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    attn_weights = scale * torch.einsum("qhd,khd->hqk", query.float(), key.float())
    attn_weights = torch.softmax(attn_weights, dim=-1)
    return torch.einsum("hqk,khd->qhd", attn_weights, value.float())


def ref_single_query_cached_kv_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    num_seqs, num_query_heads, head_size = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_queries_per_kv = num_query_heads // num_kv_heads
    output = torch.empty(num_seqs, num_query_heads, head_size, dtype=torch.float32)
    for i in range(num_seqs):
        seq_len = int(seq_lens[i])
        pos = torch.arange(seq_len)
        blocks = block_tables[i].long().cpu()[pos // block_size]
        keys = key_cache.cpu()[blocks, pos % block_size]  # gather: [seq_len, kv_heads, head_dim]
        values = value_cache.cpu()[blocks, pos % block_size]
        keys = torch.repeat_interleave(keys, num_queries_per_kv, dim=1)  # GQA
        values = torch.repeat_interleave(values, num_queries_per_kv, dim=1)
        output[i] = ref_masked_attention(query[i].cpu().unsqueeze(0), keys, values, scale).view(
            num_query_heads, head_size
        )
    return output


# Adapted from vLLM tests/kernels/attention/test_cache.py (test_reshape_and_cache_flash,
# "Run the reference implementation" loop), plus skipping of slot -1.
def ref_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    block_size = key_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = key[i]
        value_cache[slot // block_size, slot % block_size] = value[i]


# --- helpers ----------------------------------------------------------------------
def make_decode_case(context_lens, block_size, num_q_heads, num_kv_heads, head_dim, dtype, seed=0):
    """Caches full of NaN except the visible tokens; shuffled, non-contiguous block tables
    with one extra padded column, so any read past context_len poisons the output."""
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_tables = poisoned_paged_cache(context_lens, block_size, num_kv_heads,
                                                          head_dim, dtype, gen, spare_blocks=5)
    q = torch.randn(len(context_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    context_lens_t = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, block_tables, context_lens_t)]


def check_decode(context_lens, block_size, num_q_heads, num_kv_heads, head_dim, dtype, num_splits=0, config=None,
                 extra_columns=0):
    """The op (or, with ``config``, the kernel launched with that config) against the reference."""
    q, k_cache, v_cache, block_tables, context_lens_t = make_decode_case(
        context_lens, block_size, num_q_heads, num_kv_heads, head_dim, dtype
    )
    if extra_columns:  # a table much wider than any context, as under CUDA graphs
        block_tables = torch.cat([block_tables, block_tables.new_zeros(len(context_lens), extra_columns)], 1)
    scale = head_dim**-0.5
    if config is None:
        out = torch.ops.adp.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens_t, scale, num_splits)
    else:
        out = pa.paged_decode(q, k_cache, v_cache, block_tables, context_lens_t, scale, **config)
    assert out.shape == q.shape and out.dtype == dtype
    ref = ref_single_query_cached_kv_attention(q, k_cache, v_cache, block_tables, context_lens_t, scale)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=rtol)


# --- paged_decode_attention -------------------------------------------------------
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_fp32_grid(block_size, num_q_heads, num_kv_heads, head_dim):
    check_decode(CONTEXT_LENS, block_size, num_q_heads, num_kv_heads, head_dim, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 128), (32, 1, 64)])
def test_decode_half_precision(dtype, block_size, num_kv_heads, head_dim):
    check_decode(CONTEXT_LENS, block_size, 4, num_kv_heads, head_dim, dtype)


def test_decode_non_power_of_two_head_dim_and_wide_group():
    # head_dim 96 is padded to 128 and masked; group of 8 q heads per kv head.
    check_decode([5, 40], 16, 8, 1, 96, torch.float32)


@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_decode_split_k(num_splits):
    # Forced flash-decoding splits, including more splits than some sequences have blocks.
    check_decode(CONTEXT_LENS, 16, 4, 2, 64, torch.float32, num_splits=num_splits)


def test_decode_split_k_bf16():
    check_decode([100, 3], 16, 4, 2, 64, torch.bfloat16, num_splits=4)


def _config(tokens=32, num_warps=4, num_stages=2, native_dot=True, num_splits=1):
    return dict(tokens=tokens, num_warps=num_warps, num_stages=num_stages, native_dot=native_dot, num_splits=num_splits)


# Tiles of several blocks, of exactly one block, and of part of a block (tokens < block_size);
# pipelined or not; contexts that end mid-tile and mid-block.
@pytest.mark.parametrize("tokens,block_size", [(64, 16), (16, 16), (16, 32), (128, 32)])
@pytest.mark.parametrize("num_stages", [1, 3])
def test_decode_tile_configs(tokens, block_size, num_stages):
    check_decode(CONTEXT_LENS, block_size, 4, 2, 64, torch.float32,
                 config=_config(tokens=tokens, num_stages=num_stages))  # fmt: skip


@pytest.mark.parametrize("native_dot", [True, False])
def test_decode_fp16_dot_modes(native_dot):
    # fp16 runs the native 16-bit dot under the interpreter too (bf16 cannot: see paged_decode).
    check_decode(CONTEXT_LENS, 16, 8, 2, 128, torch.float16, config=_config(tokens=64, native_dot=native_dot))


@pytest.mark.parametrize("tokens,num_splits", [(16, 3), (32, 5), (64, 2)])
def test_decode_split_k_configs(tokens, num_splits):
    # Splits cut each sequence's own context (not the table width) into whole tiles.
    check_decode(CONTEXT_LENS, 16, 4, 2, 64, torch.float32, config=_config(tokens=tokens, num_splits=num_splits))


def test_decode_split_k_wide_table():
    # A table 40 blocks wider than any context (CUDA graphs size it for the longest sequence):
    # every split must still get its share of the real context, and padding is never read.
    check_decode([100, 3, 40], 16, 4, 2, 64, torch.float32, config=_config(tokens=16, num_splits=4),
                 extra_columns=40)  # fmt: skip
    check_decode([100, 3, 40], 16, 4, 2, 64, torch.float32, num_splits=4, extra_columns=40)


def test_decode_int64_cache_offsets(monkeypatch):
    # Caches past 2^31 elements switch the gathered row offsets to int64; same results.
    monkeypatch.setattr(pa, "_cache_needs_int64", lambda k_cache: True)
    check_decode(CONTEXT_LENS, 16, 4, 2, 64, torch.float32, config=_config(tokens=32, num_splits=2))


def test_decode_config_table_covers_head_dims():
    q = torch.zeros(2, 4, 128, dtype=torch.bfloat16)
    for head_dim, dtype in [(64, torch.bfloat16), (96, torch.float16), (128, torch.float32), (512, torch.bfloat16)]:
        cache = torch.zeros(1, 16, 2, head_dim, dtype=dtype)
        cfg = pa.decode_config(q, cache, max_blocks=8)
        assert set(cfg) == {"tokens", "num_warps", "num_stages", "native_dot", "num_splits"}
        assert cfg["tokens"] >= 16 and cfg["num_splits"] == 1  # no split-K heuristic off CUDA
    assert pa.decode_config(q, cache, max_blocks=8, num_splits=3)["num_splits"] == 3


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_empty_context_gives_zeros(num_splits):
    # context_len 0 (a padded batch row) must give zeros, not NaN, and leave other rows intact.
    q, k_cache, v_cache, block_tables, _ = make_decode_case([7, 20], 16, 4, 2, 64, torch.float32)
    lens = torch.tensor([0, 20], dtype=torch.int32, device=DEVICE)
    out = torch.ops.adp.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.125, num_splits)
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    ref = ref_single_query_cached_kv_attention(q[1:], k_cache, v_cache, block_tables[1:], lens[1:], 0.125)
    torch.testing.assert_close(out[1:].cpu(), ref, atol=1e-5, rtol=1e-5)


def test_decode_strided_inputs():
    # q as a slice of a fused qkv row, caches as views into one [2, ...] kv tensor,
    # int64 block tables / context lens: the wrapper must honour strides, not assume contiguity.
    q, k_cache, v_cache, block_tables, lens = make_decode_case([33, 9], 16, 4, 2, 64, torch.float32)
    fused = torch.cat([q, torch.randn(2, 4, 64, device=DEVICE)], dim=1)
    kv = torch.stack([k_cache, v_cache])
    out = torch.ops.adp.paged_decode_attention(fused[:, :4], kv[0], kv[1], block_tables.long(), lens.long(), 0.125)
    ref = ref_single_query_cached_kv_attention(q, k_cache, v_cache, block_tables, lens, 0.125)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_decode_rejects_bad_gqa_ratio():
    q, k_cache, v_cache, block_tables, lens = make_decode_case([3], 16, 4, 4, 64, torch.float32)
    with pytest.raises(AssertionError, match="multiple of kv heads"):
        torch.ops.adp.paged_decode_attention(q[:, :3], k_cache, v_cache, block_tables, lens, 0.125)


# --- reshape_and_cache ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache_matches_reference(block_size, dtype):
    gen = torch.Generator().manual_seed(1)
    num_blocks, kv_heads, head_dim, num_tokens = 6, 2, 64, 11
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1  # padding tokens must not be written
    key = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref_reshape_and_cache(key, value, k_ref, v_ref, slots)

    k_dev, v_dev = k_cache.to(DEVICE), v_cache.to(DEVICE)
    torch.ops.adp.reshape_and_cache(key.to(DEVICE), value.to(DEVICE), k_dev, v_dev, slots.to(DEVICE))
    assert torch.equal(k_dev.cpu(), k_ref) and torch.equal(v_dev.cpu(), v_ref)


def test_reshape_and_cache_all_padding_and_empty():
    k_cache = torch.zeros(2, 16, 1, 64, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    ones = torch.ones(3, 1, 64, device=DEVICE)
    torch.ops.adp.reshape_and_cache(ones, ones, k_cache, v_cache, torch.full((3,), -1, device=DEVICE))
    empty = ones[:0]
    torch.ops.adp.reshape_and_cache(empty, empty, k_cache, v_cache, torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert not k_cache.any() and not v_cache.any()


# --- end to end with the allocator -----------------------------------------------
def test_cache_write_then_decode_matches_dense_attention():
    # Prefill two sequences, then one decode step each, all through PagedKVCache.
    cache = PagedKVCache(1, 12, 16, 2, 64, torch.float32, DEVICE)
    k_layer, v_layer = cache.layer(0)
    gen = torch.Generator().manual_seed(2)
    prompt = {"a": 30, "b": 5}
    dense_k, dense_v, slots = {}, {}, []
    for sid, n in prompt.items():
        slots += cache.allocate(sid, n)
        dense_k[sid] = torch.randn(n, 2, 64, generator=gen)
        dense_v[sid] = torch.randn(n, 2, 64, generator=gen)
    # Batch padded to 40 tokens (as under CUDA graphs): padded rows carry slot -1.
    pad = torch.full((40 - len(slots), 2, 64), float("nan"))
    keys = torch.cat([*dense_k.values(), pad]).to(DEVICE)
    values = torch.cat([*dense_v.values(), pad]).to(DEVICE)
    torch.ops.adp.reshape_and_cache(keys, values, k_layer, v_layer, cache.slot_mapping(slots, pad_to=40))

    step_slots = []
    for sid in prompt:  # the decode token: appended, written, then attended over
        step_slots += cache.append(sid)
        dense_k[sid] = torch.cat([dense_k[sid], torch.randn(1, 2, 64, generator=gen)])
        dense_v[sid] = torch.cat([dense_v[sid], torch.randn(1, 2, 64, generator=gen)])
    new_k = torch.stack([dense_k[s][-1] for s in prompt]).to(DEVICE)
    new_v = torch.stack([dense_v[s][-1] for s in prompt]).to(DEVICE)
    torch.ops.adp.reshape_and_cache(new_k, new_v, k_layer, v_layer, cache.slot_mapping(step_slots))

    q = torch.randn(2, 4, 64, generator=gen)
    out = torch.ops.adp.paged_decode_attention(
        q.to(DEVICE), k_layer, v_layer, cache.block_tables(list(prompt), max_blocks=4),
        cache.context_lens(list(prompt)), 0.125,
    )
    for i, sid in enumerate(prompt):
        ref = ref_masked_attention(
            q[i : i + 1], dense_k[sid].repeat_interleave(2, 1), dense_v[sid].repeat_interleave(2, 1), 0.125
        )
        torch.testing.assert_close(out[i].cpu(), ref[0], atol=1e-5, rtol=1e-5)


# --- tracing ----------------------------------------------------------------------
def _attention_step(q, key, value, k_cache, v_cache, slot_mapping, block_tables, context_lens):
    torch.ops.adp.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    return torch.ops.adp.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.125) * 2


def _step_inputs():
    q, k_cache, v_cache, block_tables, lens = make_decode_case([7, 20], 16, 4, 2, 64, torch.float32)
    key = torch.randn(2, 2, 64, device=DEVICE)
    slots = torch.tensor([6, -1], device=DEVICE)
    return q, key, key.clone(), k_cache, v_cache, slots, block_tables, lens


def test_make_fx_fake_tracing():
    gm = make_fx(_attention_step, tracing_mode="fake")(*_step_inputs())
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.adp.reshape_and_cache.default in targets
    assert torch.ops.adp.paged_decode_attention.default in targets


def test_torch_compile_fullgraph_matches_eager():
    inputs = _step_inputs()
    eager_inputs = [t.clone() for t in inputs]
    compiled = torch.compile(_attention_step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), _attention_step(*eager_inputs), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inputs[3], eager_inputs[3], equal_nan=True)  # the cache write happened


def test_opcheck():
    q, key, value, k_cache, v_cache, slots, block_tables, lens = _step_inputs()
    torch.library.opcheck(torch.ops.adp.reshape_and_cache.default, (key, value, k_cache, v_cache, slots))
    torch.library.opcheck(
        torch.ops.adp.paged_decode_attention.default, (q, k_cache, v_cache, block_tables, lens, 0.125, 1)
    )
