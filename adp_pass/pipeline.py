"""The pipeline runner: capture → detect → rewrite → weights → lower → KV cache → rank passes.

Every entry point (``runtime/prepare.py``, ``adp rewrite``, ``adp verify``'s ranks, the
``torch.compile`` backend) runs the stages through one :class:`Pipeline`, calling the stages it
needs in pipeline order::

    pipeline = Pipeline(dump_dir="dumps")           # dump_dir: optional
    captured = pipeline.capture(lambda: capture_hf(config, tp, rank))
    pipeline.fp8_linears(captured.gm, fp8_weights)  # an FP8 checkpoint served in FP8 only
    plan = pipeline.detect(captured.gm, mapping)
    gm = pipeline.rewrite(captured.gm, plan)
    pipeline.weights(gm, fill)
    gm = pipeline.lower(gm)
    gm = pipeline.insert_cache(gm, num_blocks=256, block_size=16, device=device, dtype=dtype)
    pipeline.store(lambda: build_cache.store(...))  # or pipeline.loaded(gm, seconds) on a hit
    gm = pipeline.fuse_projections(gm)              # the rank passes, on filled weights
    gm = pipeline.decode_mm(gm)
    gm = pipeline.prefetch_weights(gm, device)
    pipeline.reports["rewrite"]                     # RewriteStageReport(stage, seconds, ...)

Each stage returns what the next one takes and records its typed report (a
:class:`StageReport` subclass: seconds, ``skipped``, and the stage's own counts as fields) in
``pipeline.reports``, the one place reports are kept. With ``dump_dir``, each stage that changes
the graph also writes it as readable text, ``01-capture.txt``, ``02-detect.txt`` (the plan),
``03-rewrite.txt``, ...

The stage functions themselves (``capture``, ``detect``, ``rewrite``, ``lower``,
``insert_kv_cache``, the rank passes) stay usable on their own; the runner only sequences,
times and records.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.fx as fx

from adp_pass.detect import detect
from adp_pass.fx_vocab import COLLECTIVE_OPS, is_op
from adp_pass.graph_record import RewriteReport, graph_record
from adp_pass.mapping import Mapping
from adp_pass.plan import Plan
from adp_pass.rewrite import rewrite_and_report
from adp_pass.runtime.serving_config import ServingConfig
from adp_pass.stage_reports import (CacheReport, CaptureReport, DecodeMmReport, DetectReport,
                                    Fp8LinearsReport, FuseReport, LoadReport, LowerReport,
                                    PrefetchReport, RewriteStageReport, StageReport, StoreReport,
                                    WeightsReport)

if TYPE_CHECKING:
    from adp_pass.capture import CapturedGraph


class Pipeline:
    """Runs the stages, records one :class:`StageReport` per stage, dumps graphs on request."""

    def __init__(self, dump_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.reports: dict[str, StageReport] = {}
        # Told each stage's report as it ends (a rank's log line per stage: a start-up that
        # takes seconds shows where it is).
        self.progress = progress
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self._dumps = 0  # files written: their number orders them as the stages ran
        # The rewrite's own typed report (self-check outcome included), for the entry points.
        self.rewrite_report: RewriteReport | None = None

    # ------------------------------------------------------------------------- build stages
    def capture(self, trace: Callable[[], "CapturedGraph"]) -> "CapturedGraph":
        """``trace()`` captures the TP graph (``capture_hf``, ``capture``, or the compile
        backend's own); the caller picks how, the runner records it."""
        start = time.perf_counter()
        if self.progress is not None:
            self.progress("capture: tracing the TP graph")
        captured = trace()
        gm = captured.gm
        self._record(CaptureReport(
            stage="capture", seconds=_since(start), nodes=len(gm.graph.nodes),
            collectives=_collectives(gm),
            tensors=len(list(gm.named_parameters())) + len(list(gm.named_buffers())),
        ), text=lambda: graph_text(gm))
        return captured

    def fp8_linears(self, gm: fx.GraphModule, fp8_weights) -> fx.GraphModule:
        """The captured graph's projections whose weights are ``fp8_weights`` (an FP8
        checkpoint's, ``fp8_linears.checkpoint_fp8_weights``) become ``adp.fp8_block_linear``
        with fp8 weights and scale grids (``adp_pass/fp8_linears.py``), in place; before detect,
        so the scales are sharded with their weights."""
        from adp_pass.fp8_linears import use_fp8_linears

        start = time.perf_counter()
        done = use_fp8_linears(gm, fp8_weights)
        self._record(Fp8LinearsReport(stage="fp8_linears", seconds=_since(start),
                                      fp8_linears=done.replaced),
                     text=lambda: graph_text(gm))
        return gm

    def detect(self, gm: fx.GraphModule, mapping: Mapping | str, *, strict: bool = True) -> Plan:
        start = time.perf_counter()
        plan = detect(gm, mapping, strict=strict)
        self._record(DetectReport(
            stage="detect", seconds=_since(start), sites=plan.counts(),
            sharded_params=sum(p.layout != "replicated" for p in plan.params),
            shape_fixes=len(plan.shape_fixes), unclassified=len(plan.unclassified),
        ), text=lambda: str(plan))
        return plan

    def rewrite(
        self,
        gm: fx.GraphModule,
        plan: Plan,
        state_dict: dict[str, torch.Tensor] | None = None,
        *,
        self_check: bool = True,
    ) -> fx.GraphModule:
        start = time.perf_counter()
        new, report = rewrite_and_report(gm, plan, state_dict, self_check=self_check)
        self.rewrite_report = report
        self._record(RewriteStageReport(
            stage="rewrite", seconds=_since(start), sites_removed=report.sites_removed,
            shape_constants_fixed=report.shape_constants_fixed,
            params_replaced=report.params_replaced, nodes_removed=report.nodes_removed,
            collectives_left=report.collectives_left, self_check=report.self_check,
        ), text=lambda: graph_text(new))
        return new

    def weights(self, gm: fx.GraphModule, fill: Callable[[fx.GraphModule], None]) -> None:
        """``fill(gm)`` puts the rank's weights into ``gm`` (checkpoint, random, gathered)."""
        start = time.perf_counter()
        fill(gm)
        self._record(WeightsReport(stage="weights", seconds=_since(start),
                                   tensors=len(list(gm.named_parameters()))))

    def lower(self, gm: fx.GraphModule, *, max_position: int = ServingConfig.max_position
              ) -> fx.GraphModule:
        from adp_pass.runtime.lower import lower

        start = time.perf_counter()
        gm = lower(gm, max_position=max_position)
        self._record(LowerReport(stage="lower", seconds=_since(start),
                                 matches=dict(graph_record(gm).lowering.counts)),
                     text=lambda: graph_text(gm))
        return gm

    def insert_cache(self, gm: fx.GraphModule, *, num_blocks: int, block_size: int,
                     device: torch.device, dtype: torch.dtype) -> fx.GraphModule:
        from adp_pass.runtime.cache_insertion import insert_kv_cache

        start = time.perf_counter()
        gm = insert_kv_cache(gm, num_blocks=num_blocks, block_size=block_size, device=device,
                             dtype=dtype)
        cache = graph_record(gm).cache
        self._record(CacheReport(stage="cache", seconds=_since(start),
                                 attention_cores=cache.attention_cores,
                                 position_ids=cache.position_ids),
                     text=lambda: graph_text(gm))
        return gm

    # ------------------------------------------------------------------------- build cache
    def loaded(self, gm: fx.GraphModule, seconds: float) -> None:
        """A built graph taken from the build cache instead of the stages that make it."""
        self._record(LoadReport(stage="load", seconds=seconds, nodes=len(gm.graph.nodes)),
                     text=lambda: graph_text(gm))

    def store(self, write: Callable[[], Path]) -> Path:
        """``write()`` stores the built graph (``build_cache.store``) and returns the entry; an
        error is recorded as the reason nothing was stored, then raised."""
        start = time.perf_counter()
        try:
            path = write()
        except Exception as err:
            self._record(StoreReport(stage="store", seconds=_since(start), path="",
                                     skipped=f"not stored: {err}"))
            raise
        self._record(StoreReport(stage="store", seconds=_since(start), path=str(path)))
        return path

    # ------------------------------------------------------------------------- rank passes
    # On a rank whose weights are filled, after the build cache stored or loaded the graph:
    # cache entries keep the original parameters and plain mm nodes.
    def fuse_projections(self, gm: fx.GraphModule) -> fx.GraphModule:
        """q|k|v and gate|up become one GEMM each (``runtime/lower/fuse_projections.py``)."""
        from adp_pass.runtime.lower.fuse_projections import fuse_projections

        start = time.perf_counter()
        counts = fuse_projections(gm)
        self._record(FuseReport(stage="fuse", seconds=_since(start), **counts),
                     text=lambda: graph_text(gm))
        return gm

    def decode_mm(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Tuned projection shapes run ``adp.decode_mm`` (``runtime/lower/decode_mm.py``)."""
        from adp_pass.runtime.lower.decode_mm import use_decode_mm

        start = time.perf_counter()
        replaced = use_decode_mm(gm)
        self._record(DecodeMmReport(stage="decode_mm", seconds=_since(start), replaced=replaced),
                     text=lambda: graph_text(gm))
        return gm

    def prefetch_weights(self, gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
        """Each projection's weight prefetched into L2 (``runtime/lower/prefetch_weights.py``);
        a CUDA-only hint, skipped elsewhere."""
        if device.type != "cuda":
            self._record(PrefetchReport(stage="prefetch", seconds=0.0, attention=0, gap=0,
                                        skipped=f"an L2 hint for CUDA, not {device.type}"))
            return gm
        from adp_pass.runtime.lower.prefetch_weights import insert_weight_prefetch

        start = time.perf_counter()
        counts = insert_weight_prefetch(gm)
        self._record(PrefetchReport(stage="prefetch", seconds=_since(start), **counts),
                     text=lambda: graph_text(gm))
        return gm

    # ------------------------------------------------------------------------- results
    def seconds(self, *stages: str) -> float:
        """Total wall time of ``stages`` (those that ran)."""
        return sum(self.reports[s].seconds for s in stages if s in self.reports)

    def summary(self) -> str:
        return "; ".join(str(report) for report in self.reports.values())

    # ------------------------------------------------------------------------- records
    def _record(self, report: StageReport, text: Callable[[], str] | None = None) -> None:
        self.reports[report.stage] = report
        if self.progress is not None:
            self.progress(str(report))
        if text is not None and not report.skipped:
            self._dump(report, text)

    def _dump(self, report: StageReport, text: Callable[[], str]) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        self._dumps += 1
        path = self.dump_dir / f"{self._dumps:02d}-{report.stage}.txt"
        path.write_text(f"# {report}\n\n" + text())


def graph_text(gm: fx.GraphModule) -> str:
    """The module's graph as Python with every value's shape and dtype (fx's readable form)."""
    text = gm.print_readable(print_output=False, include_stride=False, include_device=True)
    # Captured nodes carry no source stack traces; fx says so before every run of nodes.
    return "\n".join(line for line in text.splitlines()
                     if line.strip() != "# No stacktrace found for following nodes") + "\n"


def _collectives(gm: fx.GraphModule) -> int:
    return sum(is_op(n, COLLECTIVE_OPS) for n in gm.graph.nodes)


def _since(start: float) -> float:
    return time.perf_counter() - start


# The report types are re-exported: callers of the runner read them from here.
__all__ = [
    "CacheReport", "CaptureReport", "DecodeMmReport", "DetectReport", "Fp8LinearsReport",
    "FuseReport", "LoadReport", "LowerReport", "Pipeline", "PrefetchReport", "RewriteStageReport",
    "StageReport", "StoreReport", "WeightsReport", "graph_text",
]
