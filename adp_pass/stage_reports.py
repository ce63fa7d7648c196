"""Each pipeline stage's typed report: its seconds, ``skipped``, and what it counted.

One small frozen dataclass per stage (``CaptureReport``, ``DetectReport``, ...; AutoDeploy's
``TransformInfo`` is the model), all :class:`StageReport`: ``str(report)`` is the rank's log
line, ``report.counts`` the stage's counts by name, ``to_json`` / :func:`report_from_json` how
the build cache stores the reports of the build it keeps. The runner that makes them is
``adp_pass/pipeline.py``; here because the build cache (``runtime/build_cache.py``) reads them
too and may not import the runner. Torch-free plain data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True, kw_only=True)
class StageReport:
    """What one stage did: its name, its wall time, and, in a subclass per stage, what it
    counted. ``skipped``: why a stage asked for did nothing ("" when it ran)."""

    stage: str
    seconds: float
    skipped: str = ""

    @property
    def counts(self) -> dict[str, int]:
        """The stage's counts by name, a per-kind field (detect's sites, the lowering's matches
        per pass) spread into its kinds."""
        out: dict[str, int] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _BASE_FIELDS or isinstance(value, str):
                continue
            if isinstance(value, dict):
                out.update(value)
            else:
                out[f.name] = value
        return out

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.skipped:
            return f"{self.stage} skipped ({self.skipped})"
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"{self.stage} {self.seconds:.2f} s" + (f" ({counts})" if counts else "")


_BASE_FIELDS = frozenset(f.name for f in fields(StageReport))


@dataclass(frozen=True, kw_only=True)
class CaptureReport(StageReport):
    nodes: int
    collectives: int
    tensors: int  # parameters and buffers


@dataclass(frozen=True, kw_only=True)
class Fp8LinearsReport(StageReport):
    """The captured graph's projections made FP8 (``adp_pass/fp8_linears.py``)."""

    fp8_linears: int  # projections now adp.fp8_block_linear, each weight fp8 + its scale grid


@dataclass(frozen=True, kw_only=True)
class DetectReport(StageReport):
    sites: dict[str, int]  # by kind
    sharded_params: int
    shape_fixes: int
    unclassified: int  # collectives no pattern explains


@dataclass(frozen=True, kw_only=True)
class RewriteStageReport(StageReport):
    """The pipeline's view of the rewrite's own :class:`RewriteReport`."""

    sites_removed: int
    shape_constants_fixed: int
    params_replaced: int
    nodes_removed: int
    collectives_left: int
    self_check: str


@dataclass(frozen=True, kw_only=True)
class WeightsReport(StageReport):
    tensors: int  # parameters filled


@dataclass(frozen=True, kw_only=True)
class LowerReport(StageReport):
    matches: dict[str, int]  # by lowering pass, in the order they ran


@dataclass(frozen=True, kw_only=True)
class CacheReport(StageReport):
    attention_cores: int
    position_ids: int


@dataclass(frozen=True, kw_only=True)
class LoadReport(StageReport):
    """A built graph taken from the build cache instead of the stages that make it."""

    nodes: int


@dataclass(frozen=True, kw_only=True)
class StoreReport(StageReport):
    path: str  # the build-cache entry written ("" when not stored: ``skipped`` says why)


@dataclass(frozen=True, kw_only=True)
class FuseReport(StageReport):
    groups: int  # fused GEMMs made ...
    gemms: int  # ... out of this many
    # FP8 groups sharing an input but left unfused (their scale tiles would not line up:
    # graph_record(gm).fused.refused says why); counted only when > 0.
    refused: int = 0

    @property
    def counts(self) -> dict[str, int]:
        counts = super().counts
        if not self.refused:
            del counts["refused"]
        return counts


@dataclass(frozen=True, kw_only=True)
class DecodeMmReport(StageReport):
    replaced: int  # projections now running adp.decode_mm


@dataclass(frozen=True, kw_only=True)
class PrefetchReport(StageReport):
    attention: int  # weight prefetches overlapping an attention ...
    gap: int  # ... or a run of small kernels


# Stage name -> its report type: how a stored report (the build cache's manifest) is read back.
REPORT_TYPES: dict[str, type[StageReport]] = {
    "capture": CaptureReport, "fp8_linears": Fp8LinearsReport, "detect": DetectReport,
    "rewrite": RewriteStageReport,
    "weights": WeightsReport, "lower": LowerReport, "cache": CacheReport, "load": LoadReport,
    "store": StoreReport, "fuse": FuseReport, "decode_mm": DecodeMmReport,
    "prefetch": PrefetchReport,
}


def report_from_json(doc: dict) -> StageReport:
    """A report written by :meth:`StageReport.to_json`."""
    return REPORT_TYPES[doc["stage"]](**doc)


__all__ = [
    "CacheReport", "CaptureReport", "DecodeMmReport", "DetectReport", "Fp8LinearsReport",
    "FuseReport", "LoadReport", "LowerReport", "PrefetchReport", "REPORT_TYPES",
    "RewriteStageReport", "StageReport", "StoreReport", "WeightsReport", "report_from_json",
]
