"""Qwen3-32B widths at tp=8 (one kv head per rank) capture, detect and rewrite on this CPU
machine on meta weights, without allocating its 64 GB.

All 64 layers by default: the capture traces two and stamps the others (adp_pass/stamp.py),
so the whole model costs about as much as a few layers. The same run through the CLI is
opt-in: ``python -m pytest -m full``.
"""

import pytest

from adp_pass.capture import capture_hf_qwen3
from adp_pass.cli import main
from adp_pass.detect import detect, find_collectives
from adp_pass.graph_record import graph_record
from adp_pass.presets import qwen3_config
from adp_pass.rewrite import rewrite

LAYERS = 64


@pytest.mark.slow
def test_qwen3_32b_widths_tp8_rank0_on_meta_weights():
    config = qwen3_config("qwen3-32b")
    assert config.num_hidden_layers == LAYERS
    captured = capture_hf_qwen3(config, world_size=8, rank=0, meta=True)
    assert captured.traced_layers == 2
    plan = detect(captured.gm, "tp=8,attn_dp=1")
    assert plan.counts() == {"attention_out": LAYERS, "mlp_out": LAYERS}
    # One kv head per rank: repeat_kv's expand/view of k and v must copy at full size.
    assert len(plan.views_to_copy) == 2 * LAYERS
    gm = rewrite(captured.gm, plan)
    assert find_collectives(gm.graph) == []
    shapes = {name: tuple(p.shape) for name, p in gm.named_parameters()}
    # Replicated attention: q_proj 1024 -> 8192 rows, k_proj 128 -> 1024, o_proj 8192 columns.
    assert shapes["model.layers.63.self_attn.q_proj.weight"] == (8192, 5120)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 5120)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (5120, 8192)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (5120, 25600)
    assert graph_record(gm).rewrite.sites_removed == 2 * LAYERS


@pytest.mark.slow
@pytest.mark.full
def test_qwen3_32b_tp8_rank0_all_64_layers_through_the_cli(capsys):
    code = main(["rewrite", "--preset", "qwen3-32b", "--mapping", "tp=8,attn_dp=1", "--rank", "0",
                 "--meta", "-v"])
    out = capsys.readouterr().out
    print(out[-600:])  # stage timings, kept in the test log
    assert code == 0
    assert "sites: 128 (attention_out 64, mlp_out 64); remove 128" in out
    assert "0 collectives left" in out
    assert "[1024, 5120]   -> [8192, 5120]   model.layers.63.self_attn.q_proj.weight" in out
    assert "[5120, 1024]   -> [5120, 8192]   model.layers.0.self_attn.o_proj.weight" in out
    assert "views that become reshape (copy) at full size: 128" in out
