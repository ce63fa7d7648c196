"""Structure of the rewrite, in one process on a fake process group, for both TP sources.

For world sizes 1, 2, 4, 8: exactly one attention and one MLP site per layer found and removed
(world 1 has no collective to find), the engine's embedding and LM-head collectives counted,
nothing left, and every parameter shaped and named as in the unsharded model.
"""

import pytest
import torch

from adp_pass.detect import detect, find_collectives
from adp_pass.graph_record import graph_record
from adp_pass.presets import qwen3_config
from adp_pass.rewrite import rewrite
from tp_sources import SOURCES, capture_source, unsharded_state

aten = torch.ops.aten
CONFIG = qwen3_config("tiny")  # 8 q / 8 kv heads, intermediate 128, vocab 256: divisible by 8
LAYERS = CONFIG.num_hidden_layers


# 4 ranks: opt-in (CI time); 2 and 8 bracket it, 1 is the no-TP edge.
@pytest.mark.parametrize("world_size", [1, 2, pytest.param(4, marks=pytest.mark.full), 8])
@pytest.mark.parametrize("source", SOURCES)
def test_sites_params_and_shapes(source, world_size):
    rank = world_size - 1  # the last rank: its shard offsets are the least forgiving
    captured = capture_source(source, CONFIG, world_size, rank)
    before = len(find_collectives(captured.gm.graph))
    plan = detect(captured.gm, f"tp={world_size},attn_dp=1")

    sharded = world_size > 1
    expected = {"attention_out": LAYERS, "mlp_out": LAYERS} if sharded else {}
    if sharded and source == "engine":
        expected |= {"embedding": 1, "lm_head_gather": 1}
    assert plan.counts() == expected
    assert before == sum(expected.values())
    assert plan.unclassified == []

    gm = rewrite(captured.gm, plan)
    assert find_collectives(gm.graph) == []
    assert graph_record(gm).rewrite.collectives_left == 0
    assert graph_record(gm).rewrite.sites_removed == sum(expected.values())

    want = unsharded_state(source, CONFIG)
    got = gm.state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}
    gm.load_state_dict(want, strict=True)

    # Row-parallel weights grow along their input dim, column-parallel along their output dim,
    # each by exactly the TP degree.
    for spec in plan.params:
        if spec.layout == "replicated":
            assert spec.full_shape == spec.local_shape
            continue
        ratio = [f // l for f, l in zip(spec.full_shape, spec.local_shape)]
        assert ratio[spec.dim] == world_size and sum(ratio) == world_size + len(ratio) - 1
    layouts = {p.layout for p in plan.params}
    assert layouts == ({"column", "row", "replicated"} | ({"vocab"} if source == "engine" else set())
                       if sharded else {"replicated"})


def test_fused_projections_keep_their_segments():
    captured = capture_source("engine", CONFIG, 4, 1)
    plan = detect(captured.gm, "tp=4,attn_dp=1")
    specs = {p.name: p for p in plan.params}
    head_dim = CONFIG.head_dim
    qkv = specs["layers.0.self_attn.qkv_proj.weight"]
    local_q, local_kv = CONFIG.num_attention_heads // 4 * head_dim, CONFIG.num_key_value_heads // 4 * head_dim
    assert qkv.segments == (local_q, local_kv, local_kv)
    assert qkv.shard_ranges(1, 4) == [
        (local_q, local_q),
        (4 * local_q + local_kv, local_kv),
        (4 * local_q + 4 * local_kv + local_kv, local_kv),
    ]
    gate_up = specs["layers.0.mlp.gate_up_proj.weight"]
    assert gate_up.segments == (CONFIG.intermediate_size // 4,) * 2


def test_shard_and_assemble_are_inverse():
    captured = capture_source("engine", CONFIG, 2, 0)
    plan = detect(captured.gm, "tp=2,attn_dp=1")
    spec = next(p for p in plan.params if p.name.endswith("qkv_proj.weight"))
    full = torch.randn(spec.full_shape)
    shards = [spec.shard(full, r, 2) for r in range(2)]
    assert all(tuple(s.shape) == spec.local_shape for s in shards)
    assert torch.equal(spec.assemble(shards), full)


def test_plan_is_plain_data_and_prints_a_report():
    captured = capture_source("hf", CONFIG, 2, 0)
    plan = detect(captured.gm, "tp=2,attn_dp=1")
    data = plan.to_dict()
    assert data["counts"] == {"attention_out": LAYERS, "mlp_out": LAYERS}
    assert len(data["sites"]) == 2 * LAYERS and data["views_to_copy"] == []
    assert all(f["old"] * 2 == f["new"] for f in data["shape_fixes"] if not f["multiply"])
    text = str(plan)
    assert "attention_out" in text and "model.layers.1.mlp.down_proj.weight" in text
    import json
    assert json.loads(plan.to_json())["mapping"]["tp_size"] == 2
