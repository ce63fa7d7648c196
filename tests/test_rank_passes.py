"""The passes a rank runs on its built graph, after the build cache.

* q|k|v and gate|up become one GEMM each (runtime/lower/fuse_projections.py): exact counts,
  fused shapes, the original names recoverable, and the same outputs.
* Weight prefetches into L2 (runtime/lower/prefetch_weights.py): where they go, for which
  weights, and that the graph computes the same (the op is a hint: nothing on CPU).
"""

import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from adp_pass.presets import qwen3_config
from adp_pass.runtime.engine import RankEngine, Request, decode_batch, prefill_batch
from adp_pass.runtime.kernels import prefetch
from adp_pass.runtime.kv_cache import PagedKVCache
from adp_pass.runtime.lower.fuse_projections import fuse_projections, unfused_state_dict
from adp_pass.runtime.lower.prefetch_weights import (JOIN, PREFETCH, insert_weight_prefetch,
                                                     projection_weight)
from adp_pass.runtime.prepare import prepare_rank
from adp_pass.runtime.sampling import SamplingParams

aten = torch.ops.aten


def _gemms(gm) -> int:
    return sum(n.target in (aten.mm.default, aten.addmm.default) for n in gm.graph.nodes)


@pytest.fixture(scope="module")
def built():
    """One rank of tp=2 attention-DP, built without and with the fusion."""
    config = qwen3_config("tiny", num_key_value_heads=2)
    geometry = dict(device=torch.device("cpu"), num_blocks=16, max_position=64)
    plain = prepare_rank(config, "tp=2,attn_dp=1", 0, fuse_projections=False, **geometry)
    fused = prepare_rank(config, "tp=2,attn_dp=1", 0, **geometry)
    return config, plain, fused


@pytest.mark.slow  # builds two tiny ranks (~20 s on 2 cores)
def test_qwen3_rank_fuses_qkv_and_gate_up(built):
    config, plain, fused = built
    layers = config.num_hidden_layers
    assert fused.counts["fused"] == {"groups": 2 * layers, "gemms": 5 * layers}
    # per layer 7 GEMMs (q, k, v, o, gate, up, down) become 4, plus the LM head
    assert (_gemms(plain.model), _gemms(fused.model)) == (7 * layers + 1, 4 * layers + 1)
    params = dict(fused.model.named_parameters())
    head_dim, hidden = config.head_dim, config.hidden_size
    qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    assert params["model.layers.0.self_attn.fused_q_proj_k_proj_v_proj_weight"].shape == (
        qkv_rows, hidden)
    assert params["model.layers.0.mlp.fused_gate_proj_up_proj_weight"].shape == (
        2 * config.intermediate_size, hidden)
    assert "model.layers.0.self_attn.q_proj.weight" not in params
    assert sum(p.numel() for p in params.values()) == sum(
        p.numel() for p in plain.model.parameters())
    want = plain.model.state_dict()
    got = unfused_state_dict(fused.model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow  # builds two tiny ranks (~20 s on 2 cores)
def test_fused_rank_serves_the_same_logits_and_tokens(built):
    _, plain, fused = built
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]

    def generate(built):
        engine = RankEngine(built.model, built.cache, max_batch=2)
        logits = engine.prefill_logits(prompts[0])
        results = engine.generate([Request(i, p, SamplingParams(max_new_tokens=4))
                                   for i, p in enumerate(prompts)])
        return logits, [r.tokens for r in results]

    want_logits, want_tokens = generate(plain)
    got_logits, got_tokens = generate(fused)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got_tokens == want_tokens


def test_biased_projections_fuse_and_shared_or_lone_weights_stay():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 4)
            self.b = torch.nn.Linear(8, 6)
            self.c = torch.nn.Linear(8, 3, bias=False)
            self.tied = torch.nn.Linear(8, 5, bias=False)
            self.lone = torch.nn.Linear(8, 2, bias=False)

        def forward(self, x, y):
            # a, b: biased, one input -> fused; c and tied share y, but tied's weight is read
            # again -> left alone, and c is then alone; lone reads x without a bias -> alone.
            return (self.a(x) + 1, self.b(x) * 2, self.c(y), self.tied(y),
                    self.tied.weight.sum(), self.lone(x))

    torch.manual_seed(0)
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    gm = make_fx(Toy())(x, y)
    want = gm(x, y)
    before = _gemms(gm)
    assert fuse_projections(gm) == {"groups": 1, "gemms": 2}
    assert _gemms(gm) == before - 1
    assert [n for n, _ in gm.named_parameters() if n.startswith("fused")] == [
        "fused__param_constant0__param_constant2_weight",
        "fused__param_constant1__param_constant3_bias"]
    for got, expected in zip(gm(x, y), want):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_meta_weights_are_left_alone():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 4, bias=False)
            self.k = torch.nn.Linear(8, 4, bias=False)

        def forward(self, x):
            return self.q(x), self.k(x)

    gm = make_fx(Pair())(torch.randn(2, 8))
    for name in ("_param_constant0", "_param_constant1"):
        setattr(gm, name, torch.nn.Parameter(torch.empty(4, 8, device="meta")))
    assert fuse_projections(gm) == {"groups": 0, "gemms": 0}


@pytest.mark.slow  # builds two tiny ranks (~20 s on 2 cores)
def test_a_decode_step_through_the_fused_graph_matches(built):
    _, plain, fused = built
    outs = []
    for rank in (plain, fused):
        cache = rank.cache
        slots = cache.allocate("d", 6)
        inputs, _ = prefill_batch([[1, 2, 3, 4, 5, 6]], [slots], [cache.block_table("d")], 1, 6,
                                  torch.device("cpu"))
        with torch.no_grad():
            rank.model(*inputs)
            slot = cache.append("d", 1)
            step = decode_batch([7], [6], slot, [cache.block_table("d")], [7], 1,
                                torch.device("cpu"))
            outs.append(rank.model(*step)[0])
        cache.free("d")
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# --- weight prefetch -----------------------------------------------------------------------
CACHED_ATTENTION = torch.ops.adp.cached_attention.default


def _with_prefetch(rank):
    """A copy of ``rank``'s graph with the prefetches inserted, its cache, and the counts."""
    gm = copy.deepcopy(rank.model)
    counts = insert_weight_prefetch(gm)
    layers = sum(1 for name, _ in gm.named_buffers() if name.endswith("_k"))
    cache = PagedKVCache.over([gm.get_buffer(f"kv_cache_{i}_k") for i in range(layers)],
                              [gm.get_buffer(f"kv_cache_{i}_v") for i in range(layers)])
    return gm, cache, counts


def _stream(gm):
    """The graph's projections, attentions and prefetches in order: ("mm", weight name),
    ("attention", None), ("prefetch", (weight name, site))."""
    order = []
    for node in gm.graph.nodes:
        weight = projection_weight(node)
        if weight is not None:
            order.append(("mm", weight.target))
        elif node.target is CACHED_ATTENTION:
            order.append(("attention", None))
        elif node.target is PREFETCH:
            order.append(("prefetch", (node.args[0].target, node.args[1])))
    return order


@pytest.mark.slow  # uses the two tiny ranks
@pytest.mark.parametrize("which", ["plain", "fused"])
def test_prefetches_go_where_hbm_idles_and_name_the_next_weight(built, which):
    config, plain, fused = built
    layers = config.num_hidden_layers
    gm, _, counts = _with_prefetch(plain if which == "plain" else fused)
    # Per layer: o_proj's weight ahead of the attention; one gap prefetch before gate|up (or
    # gate: up follows gate with nothing between), before down, and before the next layer's
    # q|k|v (or q); and one before the LM head. The first layer's q|k|v has nothing before it.
    assert counts == {"attention": layers, "gap": 3 * layers}
    assert sum(n.target is PREFETCH for n in gm.graph.nodes) == 4 * layers
    stream = _stream(gm)
    for i, (kind, what) in enumerate(stream):
        if kind != "prefetch":
            continue
        weight, site = what
        # The weight prefetched is the next projection's, and only heavy-free code lies between.
        later = [entry for entry in stream[i + 1:] if entry[0] == "mm"]
        assert later[0][1] == weight
        between = stream[i + 1: stream.index(later[0], i + 1)]
        assert [k for k, _ in between] == (["attention"] if site == "attention" else [])
        if site == "attention":
            assert stream[i - 1][0] == "mm"  # issued right after q|k|v (or v)
            assert weight.endswith("o_proj.weight")
    # One join of the prefetch stream, the last node before the outputs.
    joins = [n for n in gm.graph.nodes if n.target is JOIN]
    assert len(joins) == 1 and joins[0].next.op == "output"
    # Idempotent: a second run adds nothing.
    assert insert_weight_prefetch(gm) == counts
    assert sum(n.target is PREFETCH for n in gm.graph.nodes) == 4 * layers
    assert sum(n.target is JOIN for n in gm.graph.nodes) == 1


@pytest.mark.full  # the op does nothing on CPU: the structure test above is the CI check
def test_prefetching_graph_serves_the_same_logits_and_tokens(built):
    _, _, fused = built
    gm, cache, _ = _with_prefetch(fused)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]

    def generate(model, cache):
        engine = RankEngine(model, cache, max_batch=2)
        logits = engine.prefill_logits(prompts[0])
        results = engine.generate([Request(i, p, SamplingParams(max_new_tokens=3))
                                   for i, p in enumerate(prompts)])
        return logits, [r.tokens for r in results]

    want_logits, want_tokens = generate(fused.model, fused.cache)
    got_logits, got_tokens = generate(gm, cache)
    assert torch.equal(got_logits, want_logits)
    assert got_tokens == want_tokens


def test_prefetch_op_is_a_cpu_no_op_kept_by_dead_code_elimination():
    weight = torch.randn(8, 16)
    before = weight.clone()
    assert torch.ops.adp.prefetch_l2(weight, "gap") is None
    assert torch.equal(weight, before)
    assert prefetch.mode_for(weight.device) == "off"
    with pytest.raises(ValueError, match="unknown site kind 'nope'.*attention.*gap"):
        torch.ops.adp.prefetch_l2(weight, "nope")
    torch.library.opcheck(torch.ops.adp.prefetch_l2.default, (weight, "attention"))

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16, bias=False)
            self.b = torch.nn.Linear(16, 4, bias=False)

        def forward(self, x):
            return self.b(torch.ops.adp.rms_norm(self.a(x), torch.ones(16), 1e-6))

    x = torch.randn(3, 16)
    gm = make_fx(Two())(x)
    want = gm(x)
    assert insert_weight_prefetch(gm) == {"attention": 0, "gap": 1}
    from adp_pass.runtime.lower.graph_utils import eliminate_dead_code

    eliminate_dead_code(gm.graph)
    assert sum(n.target is PREFETCH for n in gm.graph.nodes) == 1
    assert sum(n.target is JOIN for n in gm.graph.nodes) == 1
    torch.ops.adp.prefetch_join(weight)  # nothing to join on CPU
    gm.recompile()
    assert torch.equal(gm(x), want)
