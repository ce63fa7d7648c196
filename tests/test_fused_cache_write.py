"""Tests for adp::cache_and_paged_decode: the decode kernel writing the step's new token itself.

The op must equal ``reshape_and_cache`` followed by ``paged_decode_attention`` exactly (the same
caches, the same outputs), whether it fuses the write (un-split launch) or not (split-K). On CPU
the Triton kernels run under the interpreter, which is slow: shapes are small.
"""


import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import adp_pass.runtime.kernels.cached_attention  # noqa: F401 -- registers adp.cached_attention
import adp_pass.runtime.kernels.paged_attention as pa
from adp_pass.runtime.kernels import reference
from kernel_reference import poisoned_paged_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Against the fp32 reference (as tests/test_paged_attention.py): summation order, final rounding.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# (context_len, write): "last" writes the token at position context_len - 1 (a decode step);
# "none" passes slot -1 (a padding row with context 0, or a row whose token is already cached);
# "spare" writes into a block no table lists (written, never attended to).
ROWS = [(1, "last"), (7, "last"), (33, "last"), (100, "last"), (0, "none"), (20, "none"), (5, "spare")]


def make_step(rows, block_size, q_heads, kv_heads, head_dim, dtype, layout="contiguous", seed=0):
    """Inputs of one decode step over caches that are NaN outside the contexts (a stray read
    poisons the output), and NaN at every slot the step writes (a read that misses the write
    does too): (q, key, value, k_cache, v_cache, slot_mapping, block_tables, context_lens)."""
    gen = torch.Generator().manual_seed(seed)
    lens = [n for n, _ in rows]
    k_cache, v_cache, tables = poisoned_paged_cache(lens, block_size, kv_heads, head_dim, dtype, gen, spare_blocks=3)
    used = {int(tables[i, j]) for i, n in enumerate(lens) for j in range(-(-n // block_size))}
    spare = iter(b for b in range(k_cache.shape[0]) if b not in used)
    slots = []
    for i, (n, write) in enumerate(rows):
        if write == "last":
            slots.append(int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size)
        elif write == "spare":
            slots.append(next(spare) * block_size + 3)
        else:
            slots.append(-1)
    written = torch.tensor([s for s in slots if s >= 0], dtype=torch.long)
    k_cache[written // block_size, written % block_size] = float("nan")
    v_cache[written // block_size, written % block_size] = float("nan")
    batch = len(rows)
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(dtype)
    if layout == "contiguous":
        key = torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype)
        value = torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype)
    elif layout == "qkv_slice":  # as cached_attention passes them: views of a fused q|k|v row
        qkv = torch.randn(batch, 1, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
        k = qkv[..., q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(batch, 1, kv_heads, head_dim)
        v = qkv[..., (q_heads + kv_heads) * head_dim:].view(batch, 1, kv_heads, head_dim)
        key, value = k.reshape(batch, kv_heads, head_dim), v.reshape(batch, kv_heads, head_dim)
        assert key._base is not None and not key.is_contiguous()
    else:  # "permuted": no unit stride on head_dim, and key/value strides differ
        key = torch.randn(head_dim, kv_heads, batch, generator=gen).to(dtype).permute(2, 1, 0)
        value = torch.randn(kv_heads, batch, head_dim, generator=gen).to(dtype).transpose(0, 1)
        assert key.stride(2) != 1 and key.stride() != value.stride()
    tensors = (q, key, value, k_cache, v_cache, torch.tensor(slots), tables, torch.tensor(lens, dtype=torch.int32))
    return tuple(t.to(DEVICE) for t in tensors)


def two_ops(q, key, value, k_cache, v_cache, slots, tables, lens, scale, num_splits):
    """Today's sequence on copies of the caches: (out, k_cache, v_cache)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    torch.ops.adp.reshape_and_cache(key, value, k_cache, v_cache, slots)
    out = torch.ops.adp.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits)
    return out, k_cache, v_cache


def fused(q, key, value, k_cache, v_cache, slots, tables, lens, scale, num_splits):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = torch.ops.adp.cache_and_paged_decode(q, key, value, k_cache, v_cache, slots, tables, lens, scale, num_splits)
    return out, k_cache, v_cache


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    bits = _BITS[got.dtype]
    assert torch.equal(got.cpu().view(bits), want.cpu().view(bits)), f"{what} differs"


def check_step(step, num_splits, scale=0.125):
    q, key, value, k_cache, v_cache, slots, tables, lens = step
    dtype = q.dtype
    want, k_want, v_want = two_ops(*step, scale, num_splits)
    got, k_got, v_got = fused(*step, scale, num_splits)
    # The whole caches, NaN poison included: the write touched exactly the same rows.
    assert_same_bits(k_got, k_want, "k_cache")
    assert_same_bits(v_got, v_want, "v_cache")
    # Same kernel, same tiles and order: bit-identical. (bf16 on a GPU: tolerance, in case the
    # compiled variants round differently.)
    if DEVICE == "cpu" or dtype != torch.bfloat16:
        assert_same_bits(got, want, "output")
    else:
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    # Independently of the two ops: the eager references.
    k_ref, v_ref = k_cache.cpu().clone(), v_cache.cpu().clone()
    reference.reshape_and_cache(key.cpu(), value.cpu(), k_ref, v_ref, slots.cpu())
    assert_same_bits(k_got, k_ref, "k_cache vs reference")
    ref = reference.varlen_attention_fp32(q.cpu(), k_ref, v_ref, tables.cpu(), torch.arange(q.shape[0] + 1),
                                          lens.cpu(), scale)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float().cpu(), ref, atol=atol, rtol=rtol)
    assert not got.isnan().any()
    return got


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reshape_and_cache_then_decode(dtype, q_heads, kv_heads, num_splits):
    # num_splits 3: the unfused path (separate write launch, then the split decode).
    check_step(make_step(ROWS, 16, q_heads, kv_heads, 64, dtype), num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("layout", ["qkv_slice", "permuted"])
def test_non_contiguous_key_value(layout, num_splits):
    check_step(make_step(ROWS, 16, 4, 2, 64, torch.float32, layout=layout), num_splits)


def test_block_32_head_dim_96_int32_slots_wide_group():
    # head_dim padded to 128 (masked columns in the write too), int32 slot_mapping, 8 q heads per kv head.
    step = list(make_step([(40, "last"), (0, "none"), (3, "last")], 32, 8, 1, 96, torch.float16))
    step[5] = step[5].to(torch.int32)
    check_step(tuple(step), 1)


def test_int64_cache_offsets(monkeypatch):
    # Caches past 2^31 elements switch the cache offsets (the write's too) to int64.
    monkeypatch.setattr(pa, "_cache_needs_int64", lambda k_cache: True)
    check_step(make_step(ROWS, 16, 4, 2, 64, torch.float32), 1)


class _Launches:
    """Stands in for a @triton.jit kernel: counts ``kernel[grid](...)`` launches, keeps their kwargs."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    write, decode = _Launches(pa._reshape_and_cache_kernel), _Launches(pa._paged_decode_kernel)
    monkeypatch.setattr(pa, "_reshape_and_cache_kernel", write)
    monkeypatch.setattr(pa, "_paged_decode_kernel", decode)
    # The wrapper is no InterpretedFunction: keep the ops from taking their eager CPU fallback.
    monkeypatch.setattr(pa, "eager_on_cpu", lambda kernel, *tensors: False)
    return write, decode


@pytest.mark.parametrize("num_splits,fused_write", [(1, True), (3, False)])
def test_write_launch_only_when_split(launches, num_splits, fused_write):
    write, decode = launches
    q, key, value, k_cache, v_cache, slots, tables, lens = make_step(ROWS[:3], 16, 4, 2, 64, torch.float32)
    torch.ops.adp.cache_and_paged_decode(q, key, value, k_cache, v_cache, slots, tables, lens, 0.125, num_splits)
    assert len(write.calls) == (0 if fused_write else 1)
    assert [c["WRITE_NEW"] for c in decode.calls] == [fused_write]
    assert [c["SPLIT"] for c in decode.calls] == [not fused_write]
    assert torch.equal(k_cache[slots[1] // 16, slots[1] % 16].cpu(), key[1].cpu())  # written either way


def test_cached_attention_decode_is_one_launch(launches):
    # cached_attention's S == 1 branch: no separate write, and the same result as the two ops.
    write, decode = launches
    q, _, _, k_cache, v_cache, slots, tables, lens = make_step(ROWS, 16, 4, 2, 64, torch.float32)
    assert pa.decode_config(q, k_cache, tables.shape[1])["num_splits"] == 1  # on CUDA too: a short table
    gen = torch.Generator().manual_seed(5)
    batch = q.shape[0]
    qkv = torch.randn(batch, 1, 8 * 64, generator=gen).to(DEVICE)  # a fused q|k|v projection row
    q4 = qkv[..., : 4 * 64].view(batch, 1, 4, 64).transpose(1, 2)
    k4 = qkv[..., 4 * 64 : 6 * 64].view(batch, 1, 2, 64).transpose(1, 2)
    v4 = qkv[..., 6 * 64 :].view(batch, 1, 2, 64).transpose(1, 2)
    k_got, v_got = k_cache.clone(), v_cache.clone()
    got = torch.ops.adp.cached_attention(q4, k4, v4, k_got, v_got, slots, tables, lens, 0.125)
    assert len(write.calls) == 0 and [c["WRITE_NEW"] for c in decode.calls] == [True]
    want, k_want, v_want = two_ops(q4[:, :, 0], k4[:, :, 0], v4[:, :, 0], k_cache, v_cache, slots, tables, lens,
                                   0.125, 0)
    assert got.shape == (batch, 4, 1, 64)
    assert_same_bits(got[:, :, 0].contiguous(), want, "output")
    assert_same_bits(k_got, k_want, "k_cache")
    assert_same_bits(v_got, v_want, "v_cache")


@pytest.mark.parametrize("num_splits", [1, 2])
def test_opcheck(num_splits):
    q, key, value, k_cache, v_cache, slots, tables, lens = make_step([(7, "last"), (20, "last"), (0, "none")],
                                                                     16, 4, 2, 64, torch.float32)
    torch.library.opcheck(torch.ops.adp.cache_and_paged_decode.default,
                          (q, key, value, k_cache, v_cache, slots, tables, lens, 0.125, num_splits))


def test_make_fx_traces_one_node():
    step = make_step([(7, "last"), (0, "none")], 16, 4, 2, 64, torch.float32)

    def decode_step(q, key, value, k_cache, v_cache, slots, tables, lens):
        return torch.ops.adp.cache_and_paged_decode(q, key, value, k_cache, v_cache, slots, tables, lens, 0.125) * 2

    gm = make_fx(decode_step, tracing_mode="fake")(*step)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.adp.cache_and_paged_decode.default) == 1
    assert torch.ops.adp.reshape_and_cache.default not in targets


@pytest.mark.skipif(DEVICE == "cpu", reason="a race needs the compiled kernel: CUDA only")
@pytest.mark.parametrize("num_stages", [1, 3, 5])
def test_fused_write_visible_on_gpu(num_stages):
    # Qwen3-8B-like decode (32 q / 8 kv heads, head_dim 128, bf16), many programs: every
    # program must read back the row it wrote (the old row is NaN), pipelined or not.
    gen = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 300, (128,), generator=gen).tolist()
    step = make_step([(n, "last") for n in lens], 16, 32, 8, 128, torch.bfloat16, layout="qkv_slice")
    q, key, value, k_cache, v_cache, slots, tables, lens_t = step
    config = dict(pa.decode_config(q, k_cache, tables.shape[1], 1), num_stages=num_stages)
    for _ in range(3):
        k_want, v_want = k_cache.clone(), v_cache.clone()
        torch.ops.adp.reshape_and_cache(key, value, k_want, v_want, slots)
        want = pa.paged_decode(q, k_want, v_want, tables, lens_t, 0.088, **config)
        k_got, v_got = k_cache.clone(), v_cache.clone()
        got = pa.paged_decode(q, k_got, v_got, tables, lens_t, 0.088, **config,
                              new_key=key, new_value=value, slot_mapping=slots)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=TOLERANCES[torch.bfloat16][0], rtol=TOLERANCES[torch.bfloat16][1])
        assert_same_bits(k_got, k_want, "k_cache")
        assert_same_bits(v_got, v_want, "v_cache")


def test_rejects_bad_inputs():
    q, key, value, k_cache, v_cache, slots, tables, lens = make_step([(7, "last"), (3, "last")], 16, 4, 2, 64,
                                                                     torch.float32)
    op = torch.ops.adp.cache_and_paged_decode
    with pytest.raises(AssertionError, match="one new token per sequence"):
        op(q[:1], key, value, k_cache, v_cache, slots, tables[:1], lens[:1], 0.125)
    with pytest.raises(AssertionError, match="dtype mismatch"):
        op(q, key.half(), value.half(), k_cache, v_cache, slots, tables, lens, 0.125)
    with pytest.raises(AssertionError, match="slot_mapping"):
        op(q, key, value, k_cache, v_cache, slots[:1], tables, lens, 0.125)
    with pytest.raises(AssertionError, match="multiple of kv heads"):
        op(q[:, :3], key, value, k_cache, v_cache, slots, tables, lens, 0.125)
