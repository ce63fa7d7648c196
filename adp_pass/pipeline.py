"""The pipeline runner: capture → detect → rewrite → (weights) → lower → KV cache.

Every entry point (``runtime/prepare.py``, ``adp rewrite``, ``adp verify``'s ranks, the
``torch.compile`` backend) runs the stages through one :class:`Pipeline`, calling the stages it
needs in pipeline order::

    pipeline = Pipeline(dump_dir="dumps")           # dump_dir: optional
    captured = pipeline.capture(lambda: capture_hf(config, tp, rank))
    plan = pipeline.detect(captured.gm, mapping)
    gm = pipeline.rewrite(captured.gm, plan)
    gm = pipeline.lower(gm)
    gm = pipeline.insert_cache(gm, num_blocks=256, block_size=16, device=device, dtype=dtype)
    pipeline.reports["rewrite"]                     # StageReport(stage, seconds, counts)

Each stage returns what the next one takes and records a :class:`StageReport` (its seconds and
match counts) in ``pipeline.reports``, the one place reports are kept. With ``dump_dir``, each
stage also writes the graph it produced as readable text, ``01-capture.txt``,
``02-detect.txt`` (the plan), ``03-rewrite.txt``, ...

The stage functions themselves (``capture``, ``detect``, ``rewrite``, ``lower``,
``insert_kv_cache``) stay usable on their own; the runner only sequences, times and records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.fx as fx

from adp_pass.detect import detect
from adp_pass.fx_vocab import COLLECTIVE_OPS, is_op
from adp_pass.mapping import Mapping
from adp_pass.plan import Plan
from adp_pass.rewrite import RewriteReport, rewrite_and_report

if TYPE_CHECKING:
    from adp_pass.capture import CapturedGraph


@dataclass(frozen=True)
class StageReport:
    """What one stage did: its name, its wall time and what it counted (matches, nodes, ...)."""

    stage: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"{self.stage} {self.seconds:.2f} s" + (f" ({counts})" if counts else "")


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

    # ------------------------------------------------------------------------- stages
    def capture(self, trace: Callable[[], "CapturedGraph"]) -> "CapturedGraph":
        """``trace()`` captures the TP graph (``capture_hf``, ``capture``, or the compile
        backend's own); the caller picks how, the runner records it."""
        start = time.perf_counter()
        if self.progress is not None:
            self.progress("capture: tracing the TP graph")
        captured = trace()
        gm = captured.gm
        self._record("capture", start, {
            "nodes": len(gm.graph.nodes),
            "collectives": _collectives(gm),
            "tensors": len(list(gm.named_parameters())) + len(list(gm.named_buffers())),
        }, text=lambda: graph_text(gm))
        return captured

    def detect(self, gm: fx.GraphModule, mapping: Mapping | str, *, strict: bool = True) -> Plan:
        start = time.perf_counter()
        plan = detect(gm, mapping, strict=strict)
        self._record("detect", start, {
            **plan.counts(),
            "sharded_params": sum(p.layout != "replicated" for p in plan.params),
            "shape_fixes": len(plan.shape_fixes),
            "unclassified": len(plan.unclassified),
        }, text=lambda: str(plan))
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
        self._record("rewrite", start, {
            "sites_removed": report.sites_removed,
            "shape_constants_fixed": report.shape_constants_fixed,
            "params_replaced": report.params_replaced,
            "nodes_removed": report.nodes_removed,
            "collectives_left": report.collectives_left,
        }, text=lambda: graph_text(new))
        return new

    def weights(self, gm: fx.GraphModule, fill: Callable[[fx.GraphModule], None]) -> None:
        """``fill(gm)`` puts the rank's weights into ``gm`` (checkpoint, random, gathered)."""
        start = time.perf_counter()
        fill(gm)
        self._record("weights", start, {"tensors": len(list(gm.named_parameters()))})

    def lower(self, gm: fx.GraphModule, *, max_position: int = 4096) -> fx.GraphModule:
        from adp_pass.runtime.lower import lower

        start = time.perf_counter()
        gm = lower(gm, max_position=max_position)
        # lower() keeps its counts with the graph: the build cache stores them in the entry.
        self._record("lower", start, dict(gm.meta.get("adp_lower_counts", {})),
                     text=lambda: graph_text(gm))
        return gm

    def insert_cache(self, gm: fx.GraphModule, *, num_blocks: int, block_size: int,
                     device: torch.device, dtype: torch.dtype) -> fx.GraphModule:
        from adp_pass.runtime.cache_insertion import insert_kv_cache

        start = time.perf_counter()
        gm = insert_kv_cache(gm, num_blocks=num_blocks, block_size=block_size, device=device,
                             dtype=dtype)
        self._record("cache", start, dict(gm.meta.get("adp_cache_counts", {})),
                     text=lambda: graph_text(gm))
        return gm

    def loaded(self, gm: fx.GraphModule, seconds: float) -> None:
        """A built graph taken from the build cache instead of the stages that make it."""
        self.reports["load"] = StageReport("load", seconds, {"nodes": len(gm.graph.nodes)})
        self._dump("load", lambda: graph_text(gm))

    # ------------------------------------------------------------------------- results
    def seconds(self, *stages: str) -> float:
        """Total wall time of ``stages`` (those that ran)."""
        return sum(self.reports[s].seconds for s in stages if s in self.reports)

    def summary(self) -> str:
        return "; ".join(str(report) for report in self.reports.values())

    # ------------------------------------------------------------------------- records
    def _record(self, stage: str, start: float, counts: dict[str, int],
                text: Callable[[], str] | None = None) -> None:
        self.reports[stage] = StageReport(stage, time.perf_counter() - start, counts)
        if self.progress is not None:
            self.progress(str(self.reports[stage]))
        if text is not None:
            self._dump(stage, text)

    def _dump(self, stage: str, text: Callable[[], str]) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        self._dumps += 1
        path = self.dump_dir / f"{self._dumps:02d}-{stage}.txt"
        header = f"# {self.reports[stage]}\n\n"
        path.write_text(header + text())


def graph_text(gm: fx.GraphModule) -> str:
    """The module's graph as Python with every value's shape and dtype (fx's readable form)."""
    text = gm.print_readable(print_output=False, include_stride=False, include_device=True)
    # Captured nodes carry no source stack traces; fx says so before every run of nodes.
    return "\n".join(line for line in text.splitlines()
                     if line.strip() != "# No stacktrace found for following nodes") + "\n"


def _collectives(gm: fx.GraphModule) -> int:
    return sum(is_op(n, COLLECTIVE_OPS) for n in gm.graph.nodes)


__all__ = ["Pipeline", "StageReport", "graph_text"]
