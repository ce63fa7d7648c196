"""Checks on the engine-style Qwen3 fixture (tests/engine_qwen3.py): CPU, fp32, fast."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_qwen3 import EngineQwen3ForCausalLM, engine_state_dict_from_hf  # noqa: E402

TP = 2
_c10d = torch.ops._c10d_functional


def small_config(tie: bool) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        vocab_size=256, num_hidden_layers=2, tie_word_embeddings=tie, rope_theta=10000.0, use_cache=False,
    )


def random_hf_model(config: Qwen3Config) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    # Non-trivial norm weights, so a swapped q_norm/k_norm or a missing norm shows up in logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def engine_model(config: Qwen3Config, hf: Qwen3ForCausalLM, tp_size: int, tp_rank: int) -> EngineQwen3ForCausalLM:
    model = EngineQwen3ForCausalLM(config, tp_size, tp_rank, dist.group.WORLD.group_name if tp_size > 1 else None)
    model.load_state_dict(engine_state_dict_from_hf(hf.state_dict(), config, tp_size, tp_rank), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def fake_pg() -> Iterator[None]:
    """A 2-rank fake default group; a process may init the default group only once, so share/guard it."""
    if dist.is_initialized():
        if dist.get_world_size() != TP:
            pytest.skip("another test initialised a default process group of a different size")
        yield
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=TP)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tie", [False, True])
def test_tp1_matches_transformers(tie: bool) -> None:
    config = small_config(tie)
    hf = random_hf_model(config)
    engine = engine_model(config, hf, 1, 0)
    if tie:
        assert engine.lm_head.weight is engine.embed_tokens.weight
    # state_dict round-trips with exactly the helper's keys (tied: no lm_head.weight).
    assert set(engine.state_dict()) == set(engine_state_dict_from_hf(hf.state_dict(), config))
    ids = torch.randint(0, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        out = engine(ids)
    assert out.shape == ref.shape == (3, 11, config.vocab_size)
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_shard_shapes(fake_pg: None, tie: bool, rank: int) -> None:
    config = small_config(tie)
    model = engine_model(config, random_hf_model(config), TP, rank)  # strict load: shapes must agree
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {"embed_tokens.weight": (128, 64), "norm.weight": (64,)}
    if not tie:
        expected["lm_head.weight"] = (128, 64)
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        expected |= {
            p + "input_layernorm.weight": (64,),
            p + "post_attention_layernorm.weight": (64,),
            p + "self_attn.qkv_proj.weight": ((2 + 2 * 1) * 16, 64),  # 2 q heads + 1 k + 1 v head per rank
            p + "self_attn.q_norm.weight": (16,),
            p + "self_attn.k_norm.weight": (16,),
            p + "self_attn.o_proj.weight": (64, 32),
            p + "mlp.gate_up_proj.weight": (128, 64),
            p + "mlp.down_proj.weight": (64, 64),
        }
    assert shapes == expected
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie


@pytest.mark.parametrize("tie", [False, True])
def test_tp2_shards_sum_to_unsharded(fake_pg: None, tie: bool) -> None:
    """The fake group's all_reduce is the identity, so each rank's eager output is its partial sum:
    summing both ranks' partials must give the tp=1 result. Catches qkv / gate_up / GQA layout bugs."""
    config = small_config(tie)
    hf = random_hf_model(config)
    full = engine_model(config, hf, 1, 0)
    ranks = [engine_model(config, hf, TP, r) for r in range(TP)]
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = full.embed_tokens(ids)
        torch.testing.assert_close(sum(m.embed_tokens(ids) for m in ranks), h)
        pos = torch.arange(ids.shape[1], dtype=torch.float32)[:, None] * full.inv_freq
        emb = torch.cat((pos, pos), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for name in ("self_attn", "mlp"):
            args = (h, cos, sin) if name == "self_attn" else (h,)
            ref = getattr(full.layers[0], name)(*args)
            got = sum(getattr(m.layers[0], name)(*args) for m in ranks)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        local = torch.cat([torch.nn.functional.linear(h, m.lm_head.weight) for m in ranks], dim=-1)
        torch.testing.assert_close(local, full.lm_head(h))


def recording_backend(graphs: list[torch.fx.GraphModule]) -> Callable:
    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        def fw_compiler(fx_gm: torch.fx.GraphModule, _inputs: list) -> Callable:
            graphs.append(fx_gm)
            return make_boxed_func(fx_gm.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler)

    return backend


def count(gm: torch.fx.GraphModule, target: object) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("tp_size", [1, TP])
def test_compiled_aten_graph_collectives(fake_pg: None, tie: bool, tp_size: int) -> None:
    torch._dynamo.reset()
    config = small_config(tie)
    model = engine_model(config, random_hf_model(config), tp_size, 0)
    graphs: list[torch.fx.GraphModule] = []
    compiled = torch.compile(model, backend=recording_backend(graphs), fullgraph=True, dynamic=True)
    with torch.no_grad():
        for shape in [(2, 5), (3, 9)]:  # a second shape must reuse the dynamic graph
            out = compiled(torch.randint(0, config.vocab_size, shape))
            assert out.shape == (*shape, config.vocab_size)
    assert len(graphs) == 1
    gm = graphs[0]
    layers = config.num_hidden_layers
    n_ar, n_ag = (2 * layers + 1, 1) if tp_size > 1 else (0, 0)
    assert count(gm, _c10d.all_reduce.default) == n_ar
    assert count(gm, _c10d.all_gather_into_tensor.default) == n_ag
    assert count(gm, _c10d.wait_tensor.default) == n_ar + n_ag
    # Batch and sequence stay symbolic in the input placeholder.
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    ids = [v for v in vals if isinstance(v, torch.Tensor) and v.dtype == torch.int64]
    assert len(ids) == 1 and all(isinstance(s, torch.SymInt) for s in ids[0].shape)
