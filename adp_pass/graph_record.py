"""What the stages leave on a graph: one typed record under one key, ``gm.meta["adp"]``.

Capture records the traced job, rewrite its report, the lowering and the KV-cache insertion
what they matched and what later readers need (the cos/sin tables' provenance, the KV layout,
the LM head), the rank passes (projection fusion, ``decode_mm``, weight prefetch) what they
changed. Every stage reads and writes it through :func:`graph_record`; the only other adp key
on a graph is the node-level group tag (``plan.GROUP_TAG``). The build cache stores the record
as JSON (:meth:`GraphRecord.to_json` / :meth:`GraphRecord.from_json`).

Torch-free plain data, so every stage (capture, rewrite, the lowering) can import it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

META_KEY = "adp"


@dataclass
class RewriteReport:
    """What a rewrite did (``adp_pass.rewrite`` re-exports it)."""

    sites_removed: int
    shape_constants_fixed: int
    params_replaced: int
    nodes_removed: int
    collectives_left: int
    seconds: float
    self_check: str = "skipped"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CosSinTable:
    """A rotary cos/sin table the lowering registered: shape, dtype and how it was made."""

    shape: list[int]
    dtype: str
    source: str  # "build_cos_sin_cache(rope_theta=...)", "tabulated from ...", or "meta"


@dataclass
class LoweringRecord:
    counts: dict[str, int]  # matches per pass, in the order the passes ran
    ops: dict[str, int]  # adp op nodes in the lowered graph, by op
    seconds: dict[str, float]  # per pass
    notes: list[str]  # sites a pass saw but left alone, and why
    cos_sin_cache: dict[str, CosSinTable] = field(default_factory=dict)  # by attribute path


@dataclass
class KvLayout:
    """Per layer, so an engine can size its allocator from the graph alone."""

    num_blocks: int
    block_size: int
    kv_heads: list[int]
    head_dim: list[int]
    dtype: str


@dataclass
class CacheRecord:
    attention_cores: int
    position_ids: int
    kv: KvLayout
    # The matmul that computes logits only at ``logits_indices`` (the engine reads the
    # signature); None: the input was not added, ``logits_unsupported`` says why.
    lm_head: str | None
    logits_unsupported: str = ""
    unpinned_batch: list[str] = field(default_factory=list)  # rotary batch-1 shapes widened

    def counts(self) -> dict[str, int]:
        return {"attention_cores": self.attention_cores, "position_ids": self.position_ids}


@dataclass
class FusedProjections:
    groups: int  # fused GEMMs made ...
    gemms: int  # ... out of this many
    # Fused attribute -> [(original attribute, rows), ...] in concatenation order (an FP8
    # scale grid's rows are tile rows).
    names: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    # FP8 groups sharing an input but left unfused, each with its members and why (a member
    # before the last whose N is not a multiple of 128, or scales of different dtypes).
    refused: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """``groups`` and ``gemms``, and ``refused`` when some group was left unfused (so a
        bf16 rank's counts read as before)."""
        counts = {"groups": self.groups, "gemms": self.gemms}
        if self.refused:
            counts["refused"] = len(self.refused)
        return counts


@dataclass
class GraphRecord:
    # capture: the traced job (detect checks the mapping's tp against it)
    world_size: int | None = None
    rank: int | None = None
    # where the user inputs sit among the compiled function's arguments (the compile backend)
    user_input_positions: list[int] | None = None
    rewrite: RewriteReport | None = None  # set once rewritten: detect and rewrite refuse twice
    lowering: LoweringRecord | None = None
    cache: CacheRecord | None = None
    fused: FusedProjections | None = None
    decode_mm: int | None = None  # projections replaced by adp.decode_mm
    prefetch: dict[str, int] | None = None  # weight prefetches inserted, by site kind

    @property
    def rewritten(self) -> bool:
        return self.rewrite is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> GraphRecord:
        doc = dict(doc)
        if doc.get("rewrite") is not None:
            doc["rewrite"] = RewriteReport(**doc["rewrite"])
        if doc.get("lowering") is not None:
            lowering = dict(doc["lowering"])
            lowering["cos_sin_cache"] = {name: CosSinTable(**table) for name, table
                                         in lowering.get("cos_sin_cache", {}).items()}
            doc["lowering"] = LoweringRecord(**lowering)
        if doc.get("cache") is not None:
            cache = dict(doc["cache"])
            cache["kv"] = KvLayout(**cache["kv"])
            doc["cache"] = CacheRecord(**cache)
        if doc.get("fused") is not None:
            fused = dict(doc["fused"])
            fused["names"] = {name: [(str(n), int(r)) for n, r in pieces]
                              for name, pieces in fused.get("names", {}).items()}
            doc["fused"] = FusedProjections(**fused)
        return cls(**doc)


def graph_record(gm: Any) -> GraphRecord:
    """``gm``'s record, made empty on first use (a graph from elsewhere has none)."""
    meta = gm.meta
    record = meta.get(META_KEY)
    if record is None:
        record = meta[META_KEY] = GraphRecord()
    return record


def has_graph_record(gm: Any) -> bool:
    """Whether ``gm`` (any module: a plain ``nn.Module`` has no ``meta``) carries a record."""
    return isinstance(getattr(gm, "meta", {}).get(META_KEY), GraphRecord)


def set_graph_record(gm: Any, record: GraphRecord) -> None:
    gm.meta[META_KEY] = record


def copy_graph_record(source: Any, target: Any) -> None:
    """``target`` gets a copy of ``source``'s record: a stage that builds a new module from a
    graph (rewrite) must not change the original's record through a shared one."""
    if META_KEY in source.meta:
        set_graph_record(target, copy.deepcopy(graph_record(source)))


__all__ = [
    "CacheRecord", "CosSinTable", "FusedProjections", "GraphRecord", "KvLayout", "LoweringRecord",
    "META_KEY", "RewriteReport", "copy_graph_record", "graph_record", "has_graph_record",
    "set_graph_record",
]
