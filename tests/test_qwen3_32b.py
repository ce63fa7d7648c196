"""The Qwen3-32B preset at tp=8 (64 layers) captures, detects and rewrites on this CPU machine
on meta weights, without allocating its 64 GB."""

import pytest

from adp_pass.cli import main

pytestmark = pytest.mark.slow


def test_qwen3_32b_tp8_rank0_on_meta_weights(capsys):
    code = main(["rewrite", "--preset", "qwen3-32b", "--mapping", "tp=8,attn_dp=1", "--rank", "0",
                 "--meta", "-v"])  # -v: the full plan listing, checked below
    out = capsys.readouterr().out
    print(out[-600:])  # stage timings, kept in the test log
    assert code == 0
    assert "sites removed: 128 (attention_out 64, mlp_out 64)" in out
    assert "0 collectives left" in out
    # Replicated attention: q_proj 1024 -> 8192 rows, o_proj 1024 -> 8192 columns.
    assert "[1024, 5120]   -> [8192, 5120]   model.layers.63.self_attn.q_proj.weight" in out
    assert "[5120, 1024]   -> [5120, 8192]   model.layers.0.self_attn.o_proj.weight" in out
    # One kv head per rank: every GQA expand/view is resized, and 2 views per layer must copy.
    assert "views that become reshape (copy) at full size: 128" in out
    assert "stages: build" in out and "rewrite" in out
