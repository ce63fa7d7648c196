"""Tests for the PagedKVCache block allocator and its metadata tensors."""


# TRITON_INTERPRET: tests/conftest.py sets it on machines without a GPU (only there).

import pytest  # noqa: E402
import torch  # noqa: E402

from adp_pass.runtime.kv_cache import OutOfBlocksError, PagedKVCache  # noqa: E402


def make_cache(num_blocks: int = 8, block_size: int = 16) -> PagedKVCache:
    return PagedKVCache(
        num_layers=2, num_blocks=num_blocks, block_size=block_size, num_kv_heads=2, head_dim=8, dtype=torch.float32
    )


def test_storage_shapes_and_bytes_needed():
    cache = make_cache()
    assert len(cache.k_caches) == len(cache.v_caches) == 2
    k, v = cache.layer(1)
    assert k.shape == v.shape == (8, 16, 2, 8) and k.dtype == torch.float32
    total = sum(t.numel() * t.element_size() for t in cache.k_caches + cache.v_caches)
    assert PagedKVCache.bytes_needed(2, 8, 16, 2, 8, torch.float32) == total
    # Qwen3-8B-like per-rank budget: 36 layers, 8 kv heads, head_dim 128, bf16.
    assert PagedKVCache.bytes_needed(36, 1000, 16, 8, 128, torch.bfloat16) == 2 * 36 * 1000 * 16 * 8 * 128 * 2


def test_allocate_returns_slots_in_order():
    cache = make_cache()
    slots = cache.allocate("a", 20)  # 2 blocks: 0 and 1
    assert cache.block_table("a") == [0, 1]
    assert slots == list(range(20))
    assert cache.context_len("a") == 20 and cache.num_free_blocks == 6


def test_append_grows_across_block_boundaries():
    cache = make_cache()
    cache.allocate("a", 15)
    cache.allocate("b", 1)  # takes block 1, so a's next block is not contiguous
    assert cache.append("a") == [15]  # fills block 0 exactly: no new block
    assert cache.block_table("a") == [0]
    assert cache.append("a") == [2 * 16]  # token 16 opens block 2
    assert cache.block_table("a") == [0, 2]
    assert cache.append("a", 20) == [2 * 16 + i for i in range(1, 16)] + [3 * 16 + i for i in range(5)]
    assert cache.block_table("a") == [0, 2, 3] and cache.context_len("a") == 37
    assert cache.append("a", 0) == [] and cache.context_len("a") == 37


def test_allocate_zero_tokens_then_append():
    cache = make_cache()
    assert cache.allocate("a", 0) == [] and cache.block_table("a") == []
    assert cache.append("a") == [0] and cache.block_table("a") == [0]


def test_free_and_reuse():
    cache = make_cache(num_blocks=4)
    cache.allocate("a", 40)  # blocks 0, 1, 2
    cache.allocate("b", 5)  # block 3
    assert cache.num_free_blocks == 0
    cache.free("a")
    assert cache.num_free_blocks == 3
    cache.allocate("c", 33)  # reuses a's three blocks
    assert sorted(cache.block_table("c")) == [0, 1, 2]
    assert cache.block_table("b") == [3]
    with pytest.raises(KeyError, match="unknown sequence 'a'"):
        cache.context_len("a")
    cache.allocate("a", 0)  # the id is free again after free()


def test_out_of_blocks_names_needed_and_free_and_is_atomic():
    cache = make_cache(num_blocks=4)
    cache.allocate("a", 33)  # 3 blocks, 1 free
    with pytest.raises(OutOfBlocksError, match=r"needs 2 blocks, 1 free of 4"):
        cache.allocate("b", 17)
    assert cache.num_free_blocks == 1  # the failed request took nothing
    with pytest.raises(KeyError):
        cache.context_len("b")
    with pytest.raises(OutOfBlocksError, match=r"'a'.*needs 2 blocks, 1 free"):
        cache.append("a", 32)  # 33 + 32 = 65 tokens -> 5 blocks, holds 3
    assert cache.context_len("a") == 33 and cache.block_table("a") == [0, 1, 2]
    assert cache.append("a", 15) == [2 * 16 + i for i in range(1, 16)]  # 48 tokens still fit


def test_invalid_requests():
    cache = make_cache()
    cache.allocate("a", 1)
    with pytest.raises(ValueError, match="already allocated"):
        cache.allocate("a", 1)
    with pytest.raises(KeyError):
        cache.append("missing")
    with pytest.raises(KeyError):
        cache.free("missing")
    with pytest.raises(ValueError, match=">= 0"):
        cache.append("a", -1)
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache(1, 4, 24, 1, 8)
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache(1, 4, 8, 1, 8)


def test_block_tables_context_lens_and_slot_mapping_tensors():
    cache = make_cache()
    cache.allocate(7, 40)  # integer ids work too: blocks 0, 1, 2
    cache.allocate(3, 5)  # block 3
    tables = cache.block_tables([3, 7])
    assert tables.dtype == torch.int32 and tables.tolist() == [[3, 0, 0], [0, 1, 2]]
    assert cache.block_tables([3, 7], max_blocks=5).shape == (2, 5)
    with pytest.raises(ValueError, match="max_blocks=2"):
        cache.block_tables([3, 7], max_blocks=2)
    lens = cache.context_lens([7, 3])
    assert lens.dtype == torch.int32 and lens.tolist() == [40, 5]

    step = cache.append(7) + cache.append(3)
    mapping = cache.slot_mapping(step, pad_to=4)
    assert mapping.dtype == torch.int64 and mapping.tolist() == [2 * 16 + 8, 3 * 16 + 5, -1, -1]
    assert cache.slot_mapping(step).tolist() == step
    with pytest.raises(ValueError, match="pad_to=1"):
        cache.slot_mapping(step, pad_to=1)
    assert cache.block_tables([]).shape == (0, 0)


def test_slots_address_the_block_table():
    # Every slot handed out decodes (slot // block_size, slot % block_size) to the
    # sequence's own block at the token's offset, and no two live tokens share a slot.
    cache = make_cache(num_blocks=16, block_size=32)
    seen: set[int] = set()
    for sid, n in [("x", 70), ("y", 3), ("z", 31)]:
        slots = cache.allocate(sid, n) + cache.append(sid, 40)
        table = cache.block_table(sid)
        for pos, slot in enumerate(slots):
            assert table[pos // 32] == slot // 32 and pos % 32 == slot % 32
        assert seen.isdisjoint(slots)
        seen.update(slots)


def test_fp8_cache_holds_one_byte_per_element_and_a_scale_per_layer():
    cache = PagedKVCache(num_layers=3, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8,
                         dtype=torch.float8_e4m3fn, kv_scale=0.05)
    assert cache.fp8 and cache.k_caches[0].dtype == torch.float8_e4m3fn
    k_scale, v_scale = cache.layer_scales(2)
    assert k_scale.dtype == v_scale.dtype == torch.float32 and k_scale.shape == (1,)
    assert k_scale.item() == v_scale.item() == pytest.approx(0.05)
    assert k_scale is not cache.layer_scales(1)[0]  # per layer, set independently
    # Bytes per token halve against bf16 (plus 8 bytes of scales per layer).
    bf16 = PagedKVCache.bytes_needed(36, 1000, 16, 8, 128, torch.bfloat16)
    assert PagedKVCache.bytes_needed(36, 1000, 16, 8, 128, torch.float8_e4m3fn) == bf16 // 2 + 36 * 8
    assert make_cache().layer_scales(0) == (None, None) and not make_cache().fp8


def test_fp8_scales_are_required_where_they_belong():
    from adp_pass.runtime.kv_cache import KvCacheScaleError
    from adp_pass.runtime.serving_config import KvCacheDtypeError

    k = [torch.zeros(2, 16, 1, 8, dtype=torch.float8_e4m3fn) for _ in range(2)]
    scales = [torch.ones(1) for _ in range(2)]
    over = PagedKVCache.over(k, k, scales, scales)
    assert over.fp8 and over.layer_scales(1)[0] is scales[1]
    with pytest.raises(KvCacheScaleError, match="needs k_scales and v_scales"):
        PagedKVCache.over(k, k)
    with pytest.raises(KvCacheScaleError, match="only fp8 caches are scaled"):
        PagedKVCache.over([torch.zeros(2, 16, 1, 8)], [torch.zeros(2, 16, 1, 8)], scales[:1], scales[:1])
    with pytest.raises(KvCacheScaleError, match="2 layers but 1 k"):
        PagedKVCache.over(k, k, scales[:1], scales)
    with pytest.raises(KvCacheDtypeError, match="finite number > 0"):
        PagedKVCache(1, 1, 16, 1, 8, dtype=torch.float8_e4m3fn, kv_scale=0.0)
