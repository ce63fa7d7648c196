"""Parity on real ranks: separate processes, real gloo collectives, fp32.

The TP graph runs across the ranks on the whole batch; the rewritten graph runs on each rank's
own uneven slice with no collective. Both must match transformers' Qwen3ForCausalLM.
"""

import pytest

from adp_pass.cli import main
from adp_pass.presets import qwen3_config
from adp_pass.verify import verify
from tp_sources import engine_tp_source

TOLERANCE = 1e-4
pytestmark = pytest.mark.multirank


@pytest.mark.parametrize(
    "source, preset, world_size, splits",
    [
        pytest.param("hf", "tiny-3", 3, [1, 2, 2], marks=pytest.mark.full),
        # opt-in, CI time: CI checks parity on two ranks through `adp verify`'s default job
        # (test_cli_verify_default_job_on_two_ranks) and the engine-style source in
        # tests/test_source_styles.py
        pytest.param("engine", "tiny", 2, [3, 1], marks=pytest.mark.full),
        pytest.param("engine", "tiny-3", 3, [2, 1, 2], marks=pytest.mark.full),
    ],
)
def test_tp_and_attention_dp_match_transformers(source, preset, world_size, splits):
    kwargs = {"source": engine_tp_source} if source == "engine" else {}
    report = verify(
        qwen3_config(preset), world_size, batch=sum(splits), seq=7, splits=splits, **kwargs
    )
    layers = qwen3_config(preset).num_hidden_layers
    assert report.site_counts["attention_out"] == layers
    assert report.site_counts["mlp_out"] == layers
    assert report.collectives_left == 0
    assert report.tp_max_abs_diff <= TOLERANCE, report
    assert report.adp_max_abs_diff <= TOLERANCE, report


@pytest.mark.full  # CI: tests/test_mappings.py runs the lowered graphs of two mappings on ranks
def test_lowered_graph_matches_on_real_ranks():
    """The rewritten graph lowered to the Triton ops (run through the interpreter on CPU) gives
    each rank's slice the same logits as before lowering."""
    config = qwen3_config("tiny")
    report = verify(config, 2, batch=3, seq=5, splits=[1, 2], lower_ops=True)
    layers = config.num_hidden_layers
    assert report.lower_counts == {
        "rms_norm": 4 * layers + 1, "add_rms_norm": 2 * layers, "silu_mul": layers,
        "qk_norm_rope": layers,
    }
    assert report.lowered_vs_rewritten_max_abs_diff <= TOLERANCE, report
    assert report.adp_max_abs_diff <= TOLERANCE, report


def test_cli_verify_default_job_on_two_ranks(capsys):
    """The README's main job (here on the tiny preset): site table + parity, exit code 0."""
    code = main(["verify", "--preset", "tiny", "--world-size", "2", "--batch", "4", "--seq", "6",
                 "--splits", "1,3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sites: 4 (attention_out 2, mlp_out 2); remove 4" in out
    assert "rows per DP group [1, 3]" in out and "PASS" in out
