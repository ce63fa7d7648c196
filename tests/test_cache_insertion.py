"""The cache-insertion pass (runtime/cache_insertion.py) and adp::cached_attention.

Each model is captured and rewritten once per module (tp = world, attention-DP); every test
inserts the cache into its own deep copy. The Triton kernels run under the interpreter on CPU,
so shapes stay tiny. The key test is greedy decoding against transformers' ``generate``.
"""

from __future__ import annotations

import copy

# TRITON_INTERPRET: tests/conftest.py sets it on machines without a GPU (only there).

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402

from adp_pass.capture import capture_hf_qwen3  # noqa: E402
from adp_pass.detect import detect  # noqa: E402
from adp_pass.fx_vocab import ATTENTION_CORE_OPS, SOFTMAX_OPS, is_op  # noqa: E402
from adp_pass.presets import qwen3_config  # noqa: E402
from adp_pass.rewrite import rewrite  # noqa: E402
from adp_pass.runtime.cache_insertion import (  # noqa: E402
    NEW_INPUTS,
    CacheInsertionError,
    insert_kv_cache,
    kv_cache_buffers,
)
from adp_pass.runtime.kv_cache import PagedKVCache  # noqa: E402

# These run the kernels on CPU tensors, through the Triton interpreter: a session on a GPU
# machine compiles the kernels instead (tests/conftest.py), so there they do not apply; the
# GPU path is tests/test_engine_cuda.py and tests/test_paged_attention.py on CUDA tensors.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU tensors through the Triton interpreter (CPU only)")

NUM_BLOCKS, BLOCK_SIZE = 12, 16
PROMPT_LENS = (5, 12, 17)  # 12 + 5 fed tokens crosses a block boundary while decoding, 17 in prefill
NEW_TOKENS = 6
# preset -> world size (tp = world; "tiny-3" has 3 kv heads, so GQA 6:3 needs tp 3)
MODELS = {"tiny": 2, "tiny-3": 3}


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
    torch.manual_seed(0)
    config = qwen3_config(request.param)
    ref = Qwen3ForCausalLM(config).eval()
    world = MODELS[request.param]
    captured = capture_hf_qwen3(config, world_size=world, rank=0)
    gm = rewrite(captured.gm, detect(captured.gm, f"tp={world},attn_dp=1"))
    gm.load_state_dict(ref.state_dict(), strict=True)
    return config, ref, gm


def _inserted(gm: fx.GraphModule) -> fx.GraphModule:
    return insert_kv_cache(copy.deepcopy(gm), num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)


def _allocator() -> PagedKVCache:
    # Block bookkeeping only: the graph owns the cache tensors, so this one's are 1x1 per token.
    return PagedKVCache(1, NUM_BLOCKS, BLOCK_SIZE, 1, 1, dtype=torch.float32)


def _prompts(config, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _prefill(gm: fx.GraphModule, alloc: PagedKVCache, sid: int, tokens: list[int]) -> torch.Tensor:
    """A new sequence, alone in its batch: logits [1, S, V]."""
    slots = alloc.allocate(sid, len(tokens))
    ids, positions = torch.tensor([tokens]), torch.arange(len(tokens))[None]
    tables = alloc.block_tables([sid])
    return gm(ids, positions, alloc.slot_mapping(slots), tables, alloc.context_lens([sid]))[0]


def _decode(gm: fx.GraphModule, alloc: PagedKVCache, sids: list[int], tokens: list[int]) -> torch.Tensor:
    """One new token per sequence, all in one batch: logits [B, 1, V]."""
    slots = [alloc.append(sid)[0] for sid in sids]
    context_lens = alloc.context_lens(sids)  # includes the new token
    positions = (context_lens.long() - 1)[:, None]
    ids = torch.tensor(tokens)[:, None]
    return gm(ids, positions, alloc.slot_mapping(slots), alloc.block_tables(sids), context_lens)[0]


def test_counts_and_signature(model_case):
    config, ref, base = model_case
    gm = _inserted(base)
    layers = config.num_hidden_layers
    assert gm.meta["adp_cache_counts"] == {"attention_cores": layers, "position_ids": 1}
    assert not any(is_op(n, ATTENTION_CORE_OPS | SOFTMAX_OPS) for n in gm.graph.nodes)
    attn = [n for n in gm.graph.nodes if is_op(n, {torch.ops.adp.cached_attention.default})]
    assert len(attn) == layers
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert tuple(n.target for n in placeholders[1:]) == NEW_INPUTS
    batch, seq = placeholders[0].meta["val"].shape
    shapes = {n.target: tuple(n.meta["val"].shape) for n in placeholders[1:]}
    assert shapes["positions"] == (batch, seq) and shapes["context_lens"] == (batch,)
    assert shapes["slot_mapping"] == (batch * seq,) and shapes["block_tables"][0] == batch
    assert all(tuple(n.meta["val"].shape) == tuple(n.args[0].meta["val"].shape) for n in attn)
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    for k_cache, v_cache in kv_cache_buffers(gm):
        assert k_cache.shape == v_cache.shape == (NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim)
        assert k_cache.dtype == torch.float32 and not k_cache.any()
    # The caches are not part of the model's state dict.
    gm.load_state_dict(ref.state_dict(), strict=True)


def test_prefill_parity_and_cache_contents(model_case):
    config, ref, base = model_case
    gm = _inserted(base)
    ids = torch.randint(0, config.vocab_size, (1, 19))
    alloc = _allocator()
    alloc.allocate("other", 3)  # the sequence then starts at block 1, not 0
    logits = _prefill(gm, alloc, 0, ids[0].tolist())
    torch.testing.assert_close(logits, base(ids)[0], atol=1e-5, rtol=0)

    with torch.no_grad():
        past = ref(ids, use_cache=True).past_key_values
    slots = torch.tensor(alloc.block_table(0))[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)
    slots = slots.flatten()[: ids.shape[1]]
    rows = (slots // BLOCK_SIZE, slots % BLOCK_SIZE)
    for layer, (k_cache, v_cache) in enumerate(kv_cache_buffers(gm)):
        # transformers caches [1, Hkv, S, D]; token t is at cache row rows[t].
        keys, values = past.layers[layer].keys[0], past.layers[layer].values[0]
        torch.testing.assert_close(k_cache[rows], keys.transpose(0, 1), atol=1e-5, rtol=0)
        torch.testing.assert_close(v_cache[rows], values.transpose(0, 1), atol=1e-5, rtol=0)


def test_greedy_decode_matches_generate(model_case):
    """Prefill each prompt alone, then decode all three together; the tokens equal generate's."""
    config, ref, base = model_case
    gm = _inserted(base)
    prompts = _prompts(config, seed=1)
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = ref.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS
            )
            expected.append(out[0, len(prompt):].tolist())

    alloc, sids = _allocator(), list(range(len(prompts)))
    last = [int(_prefill(gm, alloc, sid, prompt)[0, -1].argmax()) for sid, prompt in enumerate(prompts)]
    generated = [[token] for token in last]
    for _ in range(NEW_TOKENS - 1):
        last = _decode(gm, alloc, sids, last)[:, -1].argmax(-1).tolist()
        for tokens, token in zip(generated, last):
            tokens.append(token)
    assert generated == expected


@pytest.mark.parametrize("lowered", [False, True], ids=["aten", "lowered"])
def test_decode_logits_match_full_recompute(model_case, lowered):
    """One decode step's logits equal the uncached graph's last-position logits. The pass also
    runs after the lowering passes (positions then reach adp.qk_norm_rope)."""
    config, ref, base = model_case
    if lowered:
        from adp_pass.runtime.lower import lower  # another team's pass: only this case depends on it

        base = lower(copy.deepcopy(base), max_position=64)
    gm = _inserted(base)
    if lowered:
        assert any(is_op(n, {torch.ops.adp.qk_norm_rope.default}) for n in gm.graph.nodes)
    prompts = _prompts(config, seed=2)
    alloc, sids = _allocator(), list(range(len(prompts)))
    for sid, prompt in enumerate(prompts):
        _prefill(gm, alloc, sid, prompt[:-1])
    logits = _decode(gm, alloc, sids, [prompt[-1] for prompt in prompts])
    for row, prompt in enumerate(prompts):
        (full,) = base(torch.tensor([prompt]))
        torch.testing.assert_close(logits[row, 0], full[0, -1], atol=1e-5, rtol=0)


def test_errors():
    ids, weight = torch.zeros(2, 5, dtype=torch.long), torch.randn(32, 16)

    def mlp(ids, weight):
        return F.embedding(ids, weight) @ weight.t()

    def softmax_attention(ids, weight):
        x = F.embedding(ids, weight)
        return torch.softmax(x @ x.transpose(1, 2), -1) @ x

    def attention_without_positions(ids, weight):
        x = F.embedding(ids, weight).view(ids.shape[0], ids.shape[1], 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(x, x, x, is_causal=True)

    cases = [
        (mlp, "no attention core"),
        (softmax_attention, "decomposed attention"),
        (attention_without_positions, "no position ids"),
    ]
    for fn, message in cases:
        gm = make_fx(fn, tracing_mode="symbolic")(ids, weight)
        with pytest.raises(CacheInsertionError, match=message):
            insert_kv_cache(gm, num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="power of two"):
        insert_kv_cache(gm, num_blocks=4, block_size=24)


def test_second_insertion_is_an_error(model_case):
    gm = _inserted(model_case[2])
    with pytest.raises(CacheInsertionError, match="already"):
        insert_kv_cache(gm, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)


def test_cached_attention_op():
    """opcheck (schema, fake impl, cache mutation) for prefill and decode; the prefill guard."""
    torch.manual_seed(3)
    k_cache = torch.zeros(4, BLOCK_SIZE, 2, 16)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    for seq, lens in ((5, [5, 5]), (1, [20, 3])):
        q, k, v = (torch.randn(2, heads, seq, 16) for heads in (4, 2, 2))
        slots = torch.arange(2 * seq, dtype=torch.int64) + BLOCK_SIZE
        lens = torch.tensor(lens, dtype=torch.int32)
        torch.library.opcheck(
            torch.ops.adp.cached_attention.default, (q, k, v, k_cache, v_cache, slots, tables, lens, 0.25)
        )
    q, k, v = (torch.randn(2, heads, 5, 16) for heads in (4, 2, 2))
    slots = torch.arange(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="new sequences only"):
        torch.ops.adp.cached_attention(
            q, k, v, k_cache, v_cache, slots, tables, torch.tensor([5, 6], dtype=torch.int32), 0.25
        )
