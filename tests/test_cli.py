"""``adp rewrite`` writes the plan, report, both graphs and a picture."""

import json
import re

import pytest

from adp_pass.cli import main


def test_rewrite_writes_outputs(tmp_path, capsys):
    code = main(["rewrite", "--preset", "tiny", "--mapping", "tp=4,attn_dp=1", "--rank", "3",
                 "--out", str(tmp_path), "--dump-dir", str(tmp_path / "dumps")])
    out, err = capsys.readouterr()
    assert code == 0
    assert "4 sites (attention_out 2, mlp_out 2): 4 removed" in out and "0 collectives left" in out
    assert len(out.splitlines()) <= 6 and "adp plan:" not in out  # the listing is in the files
    assert "adp plan: rank 3" in (tmp_path / "report.txt").read_text()
    for stage in ("build and capture", "detect", "rewrite"):  # each stage: start and time
        assert f"adp rewrite: {stage}" in err and "done in" in err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["counts"] == {"attention_out": 2, "mlp_out": 2} and plan["rank"] == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["before"]["ops"]["collectives"] == 8  # 4 all-reduces + their waits
    assert summary["before"]["collective_calls"] == 4 and summary["after"]["collective_calls"] == 0
    assert "collectives" not in summary["after"]["ops"]
    assert summary["after"]["param_elements"] > summary["before"]["param_elements"]
    assert "all_reduce" in (tmp_path / "graph_before.py").read_text()
    assert "all_reduce" not in (tmp_path / "graph_after.py").read_text()
    assert (tmp_path / "before_after.png").read_bytes()[:4] == b"\x89PNG"
    # One readable file per pipeline stage, in the order they ran, each headed by its report.
    dumps = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert dumps == ["01-capture.txt", "02-detect.txt", "03-rewrite.txt", "04-lower.txt",
                     "05-cache.txt"]
    rewritten = (tmp_path / "dumps" / "03-rewrite.txt").read_text()
    assert rewritten.startswith("# rewrite ") and "sites_removed 4" in rewritten.splitlines()[0]
    assert "all_reduce" not in rewritten and "all_reduce" in (
        tmp_path / "dumps" / "01-capture.txt").read_text()
    assert "adp plan: rank 3" in (tmp_path / "dumps" / "02-detect.txt").read_text()


def test_bad_mapping_exits_2_with_the_reason(capsys):
    code = main(["rewrite", "--preset", "tiny-3", "--mapping", "tp=4,attn_dp=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tp (4) must divide the model's num_attention_heads (6)" in err


def test_verbose_prints_the_full_plan(capsys):
    assert main(["rewrite", "--preset", "tiny", "--mapping", "tp=2,attn_dp=1", "-v"]) == 0
    out = capsys.readouterr().out
    assert "adp plan: rank 0" in out and "column" in out and "sites: 4 (attention_out 2, mlp_out 2); remove 4" in out


@pytest.mark.multirank
def test_run_prompts_show_text_progress_and_keep_the_log(tmp_path, capsys):
    code = main(["run", "--preset", "tiny", "--world-size", "2", "--prompt", "hello",
                 "--prompt", "hé", "--new-tokens", "3", "--cuda-graphs", "",
                 "--log-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "prompt-0: 'hello' -> '" in out and "prompt-1: 'hé' -> '" in out
    assert out.count("ids [") == 2
    (log,) = tmp_path.glob("run-*.log")
    # Rank lines carry the seconds since the rank's process started: "[rank 1 +12.3s] ...".
    assert re.search(r"\[rank 1 \+\d+\.\ds\] served 1/1 requests", log.read_text())
    assert re.search(r"\[rank 0 \+\d+\.\ds\] served 1/1 requests", err)
    assert f"rank logs: {log}" in err
    assert "torch.distributed" not in err  # torchrun's own lines stay in the log
