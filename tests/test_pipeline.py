"""The pipeline runner on a tiny hand-built TP graph: one typed report per stage, kept in one
place, and each stage's graph dumped as text on request (milliseconds: no model is traced).
The entry points' own use of it is covered by test_cli.py (--dump-dir) and test_build_cache.py
(prepare_rank's timings)."""

from __future__ import annotations

import json

import pytest

from adp_pass.capture import CapturedGraph
from adp_pass.graph_record import META_KEY, GraphRecord, graph_record
from adp_pass.pipeline import (CaptureReport, DetectReport, Pipeline, RewriteStageReport,
                               StageReport)
from adp_pass.rewrite import RewriteReport
from adp_pass.stage_reports import REPORT_TYPES, PrefetchReport, report_from_json
from test_site_patterns import TP, decoder


def _captured(layers: int) -> CapturedGraph:
    gm = decoder(layers)
    graph_record(gm).world_size = TP  # what capture() records for detect
    return CapturedGraph(gm, rank=0, world_size=TP)


def test_each_stage_reports_its_counts_in_one_place(tmp_path):
    pipeline = Pipeline(tmp_path)
    captured = pipeline.capture(lambda: _captured(2))
    plan = pipeline.detect(captured.gm, f"tp={TP},attn_dp=1")
    gm = pipeline.rewrite(captured.gm, plan)

    assert list(pipeline.reports) == ["capture", "detect", "rewrite"]
    assert all(isinstance(r, StageReport) and r.seconds >= 0 for r in pipeline.reports.values())
    assert [type(r) for r in pipeline.reports.values()] == [CaptureReport, DetectReport,
                                                             RewriteStageReport]
    assert pipeline.reports["detect"].sites == plan.counts()
    assert pipeline.reports["capture"].counts["collectives"] == 6
    detected = pipeline.reports["detect"].counts
    assert (detected["attention_out"], detected["mlp_out"], detected["unclassified"]) == (2, 2, 0)
    assert pipeline.reports["rewrite"].counts["collectives_left"] == 0
    assert isinstance(pipeline.rewrite_report, RewriteReport)
    assert pipeline.rewrite_report.sites_removed == 6
    # The graph keeps one adp key: its record, with the rewrite's report as the pipeline's.
    assert [k for k in gm.meta if k.startswith("adp")] == [META_KEY]
    assert graph_record(gm).rewrite == pipeline.rewrite_report
    assert not graph_record(captured.gm).rewritten  # the captured graph's record is its own
    assert pipeline.seconds("detect", "rewrite") == (pipeline.reports["detect"].seconds
                                                    + pipeline.reports["rewrite"].seconds)
    assert str(pipeline.reports["rewrite"]).startswith("rewrite ")

    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["01-capture.txt", "02-detect.txt", "03-rewrite.txt"]
    assert "all_reduce" in (tmp_path / "01-capture.txt").read_text()
    assert "all_reduce" not in (tmp_path / "03-rewrite.txt").read_text()
    assert (tmp_path / "02-detect.txt").read_text().splitlines()[2].startswith("adp plan:")


def test_no_dump_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline = Pipeline()
    captured = pipeline.capture(lambda: _captured(1))
    pipeline.rewrite(captured.gm, pipeline.detect(captured.gm, f"tp={TP},attn_dp=1"))
    assert not list(tmp_path.iterdir())


def test_reports_and_the_record_survive_json():
    """What the build cache stores: every stage report and the graph's record, as JSON."""
    pipeline = Pipeline()
    captured = pipeline.capture(lambda: _captured(1))
    gm = pipeline.rewrite(captured.gm, pipeline.detect(captured.gm, f"tp={TP},attn_dp=1"))
    for report in pipeline.reports.values():
        assert report_from_json(json.loads(json.dumps(report.to_json()))) == report
    record = graph_record(gm)
    assert GraphRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert set(REPORT_TYPES) >= {"capture", "lower", "cache", "fuse", "decode_mm", "prefetch"}


def test_a_skipped_stage_says_why():
    report = PrefetchReport(stage="prefetch", seconds=0.0, attention=0, gap=0,
                            skipped="an L2 hint for CUDA, not cpu")
    assert str(report) == "prefetch skipped (an L2 hint for CUDA, not cpu)"
    with pytest.raises(TypeError):  # typed: a stage's counts are its fields
        PrefetchReport(stage="prefetch", seconds=0.0, attention=0)
