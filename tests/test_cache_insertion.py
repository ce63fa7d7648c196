"""The cache-insertion pass (runtime/cache_insertion.py) and adp::cached_attention.

Each model is captured and rewritten once per module (tp = world, attention-DP); every test
inserts the cache into its own deep copy. The Triton kernels run under the interpreter on CPU,
so shapes stay tiny. The key test is greedy decoding against transformers' ``generate``.
"""

from __future__ import annotations

import copy
import inspect

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
from adp_pass.graph_record import graph_record  # noqa: E402
from adp_pass.presets import qwen3_config  # noqa: E402
from adp_pass.rewrite import rewrite  # noqa: E402
from adp_pass.runtime.cache_insertion import (  # noqa: E402
    NEW_INPUTS,
    CacheInsertionError,
    insert_kv_cache,
    kv_cache_buffers,
)
from adp_pass.runtime.kv_cache import PagedKVCache  # noqa: E402


NUM_BLOCKS, BLOCK_SIZE = 12, 16
PROMPT_LENS = (5, 12, 17)  # 12 + 5 fed tokens crosses a block boundary while decoding, 17 in prefill
NEW_TOKENS = 6
# preset -> world size (tp = world; "tiny-3" has 3 kv heads, so GQA 6:3 needs tp 3)
MODELS = {"tiny": 2, "tiny-3": 3}


# GQA 6:3 at tp 3 is opt-in (CI time: every test below runs per model; tests/test_runtime.py
# serves a GQA model through the cache in CI)
@pytest.fixture(scope="module", params=["tiny", pytest.param("tiny-3", marks=pytest.mark.full)])
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
    assert graph_record(gm).cache.counts() == {"attention_cores": layers, "position_ids": 1}
    assert not any(is_op(n, ATTENTION_CORE_OPS | SOFTMAX_OPS) for n in gm.graph.nodes)
    attn = [n for n in gm.graph.nodes if is_op(n, {torch.ops.adp.cached_attention.default})]
    assert len(attn) == layers
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert tuple(n.target for n in placeholders[1:]) == NEW_INPUTS
    batch, seq = placeholders[0].meta["val"].shape
    shapes = {n.target: tuple(n.meta["val"].shape) for n in placeholders[1:]}
    assert shapes["positions"] == (batch, seq) and shapes["context_lens"] == (batch,)
    assert shapes["slot_mapping"] == (batch * seq,) and shapes["block_tables"][0] == batch
    # logits_indices: found from the output, the LM head matmul on lm_head.weight; the output's
    # fake value is that of a call with it ([B, R, V]).
    (rows,) = shapes["logits_indices"]
    (out,) = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape) == (batch, rows, config.vocab_size)
    head = next(n for n in gm.graph.nodes if n.name == graph_record(gm).cache.lm_head)
    assert {n.target for n in head.all_input_nodes[1].all_input_nodes} == {"lm_head.weight"}
    defaults = {name: p.default for name, p in inspect.signature(gm.forward).parameters.items()}
    assert defaults["query_start_loc"] is None and defaults["logits_indices"] == slice(None)
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


@pytest.mark.slow
def test_logits_indices_give_the_full_graphs_rows(model_case):
    """With logits_indices the graph returns those positions' logits alone ([B, R, V]), equal to
    the full call's rows: a prefill, a packed call of three sequences, a padded batch of two, and
    no rows at all (R = 0). The lowered graph: tests/test_engine_prefill.py (prepare_rank's)."""
    config, ref, base = model_case
    gm = _inserted(base)
    torch.manual_seed(4)

    def call(*inputs, **kwargs):
        for k_cache, v_cache in kv_cache_buffers(gm):  # each call writes the same cache rows
            k_cache.zero_()
            v_cache.zero_()
        return gm(*inputs, **kwargs)[0]

    def indices(*rows):
        return torch.tensor(rows, dtype=torch.int64)

    def check(inputs, rows, **kwargs):
        full = call(*inputs, **kwargs)
        picked = call(*inputs, **kwargs, logits_indices=indices(*rows))
        assert picked.shape == (full.shape[0], len(rows), full.shape[2])
        torch.testing.assert_close(picked, full[:, list(rows)], atol=1e-5, rtol=0)
        return full

    # One new sequence of 19 tokens (two blocks); rows in any order, repeated, and none.
    alloc = _allocator()
    slots = alloc.allocate(0, 19)
    ids = torch.randint(0, config.vocab_size, (1, 19))
    prefill = (ids, torch.arange(19)[None], alloc.slot_mapping(slots), alloc.block_tables([0]),
               alloc.context_lens([0]))
    full = check(prefill, (18, 0, 7, 18))
    torch.testing.assert_close(full, base(ids)[0], atol=1e-5, rtol=0)  # the default: every row
    assert call(*prefill, logits_indices=indices()).shape == (1, 0, config.vocab_size)

    # Packed: new sequences of 5, 3 and 1 tokens back to back.
    alloc = _allocator()
    slots = alloc.allocate(0, 5) + alloc.allocate(1, 3) + alloc.allocate(2, 1)
    packed = (torch.randint(0, config.vocab_size, (1, 9)),
              torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0]]), alloc.slot_mapping(slots),
              alloc.block_tables([0, 1, 2]), alloc.context_lens([0, 1, 2]))
    check(packed, (4, 7, 8), query_start_loc=torch.tensor([0, 5, 8, 9], dtype=torch.int32))

    # Padded: two new sequences of 6 tokens; positions are selected in every row.
    alloc = _allocator()
    slots = alloc.allocate(0, 6) + alloc.allocate(1, 6)
    padded = (torch.randint(0, config.vocab_size, (2, 6)), torch.arange(6).expand(2, 6),
              alloc.slot_mapping(slots), alloc.block_tables([0, 1]), alloc.context_lens([0, 1]))
    check(padded, (5, 2))


def test_logits_indices_need_the_lm_head():
    """A graph whose output is not a weight matmul's (here: its weight is an input, not a
    module attribute) takes no logits_indices: a call with it is a TypeError, never ignored;
    select_logits=True makes that an error of the pass."""

    def attention_and_head(ids):
        batch, seq = ids.shape
        weight = torch.ones(32, 16)  # made in the graph: not a module attribute
        x = F.embedding(ids, weight) + F.embedding(torch.arange(seq).unsqueeze(0), weight)
        q = x.view(batch, seq, 2, 8).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return out.transpose(1, 2).reshape(batch, seq, 16) @ weight.t()

    ids = torch.zeros(2, 5, dtype=torch.long)
    gm = make_fx(attention_and_head, tracing_mode="symbolic")(ids)
    inserted = insert_kv_cache(copy.deepcopy(gm), num_blocks=4, block_size=16)
    assert "not a module attribute" in graph_record(inserted).cache.logits_unsupported
    assert "logits_indices" not in inspect.signature(inserted.forward).parameters
    with pytest.raises(TypeError, match="logits_indices"):
        inserted(ids, logits_indices=torch.zeros(1, dtype=torch.long))
    with pytest.raises(CacheInsertionError, match="logits_indices: .*not a module attribute"):
        insert_kv_cache(gm, num_blocks=4, block_size=16, select_logits=True)
    # Left alone when refused: no input was added, no cache registered.
    assert not [n for n in gm.graph.nodes if n.op == "placeholder" and n.target in NEW_INPUTS]


def _rotary_by_matmul(self, x, position_ids):
    """The rotary as transformers <= 5.17 computes it: an outer product by matmul of inv_freq,
    expanded over position_ids' batch, with the positions. Traced on arange[None] position ids,
    its expand and view sizes hold a literal batch of 1."""
    inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    angles = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
    both = torch.cat((angles, angles), dim=-1)
    scale = self.attention_scaling
    return (both.cos() * scale).to(x.dtype), (both.sin() * scale).to(x.dtype)


@pytest.mark.slow  # a capture and three prefills (~6 s on 2 cores)
def test_rotary_traced_with_a_batch_of_one_widens_to_the_positions(monkeypatch):
    from transformers.models.qwen3 import modeling_qwen3

    torch.manual_seed(0)
    config = qwen3_config("tiny")
    ref = Qwen3ForCausalLM(config).eval()
    monkeypatch.setattr(modeling_qwen3.Qwen3RotaryEmbedding, "forward", _rotary_by_matmul)
    captured = capture_hf_qwen3(config, world_size=2, rank=0)
    gm = rewrite(captured.gm, detect(captured.gm, "tp=2,attn_dp=1"))
    gm.load_state_dict(ref.state_dict(), strict=True)
    gm = _inserted(gm)
    # inv_freq's expand; the matmul's expand and view of each operand; the product's view
    assert len(graph_record(gm).cache.unpinned_batch) == 6, graph_record(gm).cache.unpinned_batch
    prompts = _prompts(config, seed=3)[:2]
    length = min(map(len, prompts))
    ids = torch.tensor([p[:length] for p in prompts])
    alloc = _allocator()
    slots = [alloc.allocate(sid, length) for sid in range(2)]
    positions = torch.arange(length).repeat(2, 1)
    logits = gm(ids, positions, alloc.slot_mapping([s for row in slots for s in row]),
                alloc.block_tables([0, 1]), alloc.context_lens([0, 1]))[0]
    with torch.no_grad():
        want = ref(ids).logits  # transformers' own rotary
    assert (logits - want).abs().max().item() <= 1e-4


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
