"""Build one rank's serving model: capture → (FP8 linears) → detect → rewrite → weights →
lower → KV cache → (store) → the rank passes (projection fusion, ``decode_mm``, weight
prefetch).

Every step runs through one :class:`~adp_pass.pipeline.Pipeline` (each stage's typed report in
``RankModel.reports``; with ``dump_dir``, each stage's graph as text). Runs inside a rank
*before* it joins the job's process group: the rank traces its own graph of the TP job on a
fake group (``capture_hf``), so no peer is needed to build it.

With a build cache (``cache_dir=``, or one stored entry: ``artifact=``), the built graph (the
rewritten, lowered, cache-inserted module without weights, and its plan) is loaded instead when
its key matches, and stored after a fresh build; the weights are filled either way, through the
plan (``runtime/build_cache.py``, docs/build_cache.md).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import Qwen3Config

from adp_pass.capture import capture_hf
from adp_pass.mapping import Mapping
from adp_pass.pipeline import Pipeline, StageReport
from adp_pass.plan import Plan
from adp_pass.runtime.kv_cache import PagedKVCache
from adp_pass.runtime.serving_config import ServingConfig

# ``RankModel.timings``: the keys logs and benchmarks read, each the seconds of the stages it
# covers.
TIMING_STAGES: dict[str, tuple[str, ...]] = {
    "load_s": ("load",), "capture_s": ("capture",), "fp8_s": ("fp8_linears",),
    "rewrite_s": ("detect", "rewrite"),
    "weights_s": ("weights",), "lower_s": ("lower", "cache"), "store_s": ("store",),
    "fuse_s": ("fuse",), "decode_mm_s": ("decode_mm",), "prefetch_s": ("prefetch",),
}


@dataclass
class RankModel:
    model: torch.fx.GraphModule
    cache: PagedKVCache
    plan: Plan
    # Views of the reports (stage_timings, rank_counts): what logs and benchmarks read.
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)
    # Where the graph came from: "off" (no build cache), "hit" (loaded), "miss" (built, stored),
    # "stale" / "corrupt" (an entry was found but not used: built, stored over it).
    build_cache: str = "off"
    build_cache_path: str | None = None
    build_cache_note: str = ""  # why an entry was not used, or why a build was not stored
    # Every stage that ran in this start-up, in order; a hit's ``load`` stands for the stages
    # of the stored build.
    reports: dict[str, StageReport] = field(default_factory=dict)
    # The stages that built the graph, up to the KV cache: this start-up's, or on a hit the
    # stored build's.
    build_reports: dict[str, StageReport] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for a log: the build cache's outcome and each stage's seconds."""
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in self.timings.items())
        where = f" {self.build_cache_path}" if self.build_cache_path else ""
        outcome = {
            "off": "no build cache",
            "hit": f"build cache hit{where}",
            "miss": f"build cache miss, stored{where}",
        }.get(self.build_cache, f"build cache {self.build_cache}, rebuilt{where}")
        if self.build_cache_note:
            outcome += f" ({self.build_cache_note})"
        return f"{outcome}: {stages}"


def stage_timings(reports: dict[str, StageReport]) -> dict[str, float]:
    """Seconds per ``TIMING_STAGES`` key, in the order the stages ran; stages that did nothing
    (``skipped`` in no time) are left out."""
    key_of = {stage: key for key, stages in TIMING_STAGES.items() for stage in stages}
    timings: dict[str, float] = {}
    for report in reports.values():
        if report.skipped and not report.seconds:
            continue
        key = key_of[report.stage]
        timings[key] = timings.get(key, 0.0) + report.seconds
    return timings


def rank_counts(plan: Plan, reports: dict[str, StageReport]) -> dict[str, dict]:
    """What the build matched: the plan's sites, then each graph stage's counts that ran
    (``fp8``: projections made FP8, ``lower``, ``cache``, ``fused``) and the rank passes' totals (``decode_mm``,
    ``prefetch``)."""
    counts: dict[str, dict] = {"sites": plan.counts()}
    for key, stage in (("fp8", "fp8_linears"), ("lower", "lower"), ("cache", "cache"),
                       ("fused", "fuse")):
        if stage in reports:
            counts[key] = reports[stage].counts
    for stage in ("decode_mm", "prefetch"):
        if stage in reports and not reports[stage].skipped:
            counts[stage] = sum(reports[stage].counts.values())
    return counts


def prepare_rank(
    config: Qwen3Config,
    mapping: Mapping | str,
    rank: int,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    checkpoint: str | Path | None = None,
    num_blocks: int | None = None,
    block_size: int | None = None,
    max_position: int | None = None,
    serving: ServingConfig | None = None,
    lower_ops: bool = True,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    artifact: str | Path | None = None,
    dump_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    fuse_projections: bool = True,
    decode_gemms: bool = True,
    prefetch_weights: bool = False,
    fp8_linears: bool | None = None,
) -> RankModel:
    """The rank's cache-inserted graph and its paged KV cache.

    The KV cache's ``num_blocks`` x ``block_size`` and the rotary table's ``max_position`` come
    from ``serving`` (default ``ServingConfig()``); each given on its own overrides it. So do
    the cache's element type and scale (``serving.kv_cache_dtype``, ``kv_cache_scale``): an fp8
    cache is made after the build (``cache_insertion.use_fp8_kv_cache``), so build-cache entries
    serve either.

    ``progress``: told each stage's report as it ends (the rank's log).

    Weights come from a Hugging Face ``checkpoint`` directory, or are random (seeded, equal on
    every rank) for demos and benchmarks.

    ``cache_dir``: a build cache (``build_cache.default_cache_dir()`` is the usual one): the
    rank's built graph is loaded from it when an entry for this config, mapping, rank, dtype,
    device type and versions is there, else built and stored. ``artifact``: one entry directory
    (``adp rewrite --out DIR`` writes ``DIR/cache/rank<r>-...``) to load; it is never written.
    An entry that does not match or fails its checksums is not loaded: a
    ``BuildCacheWarning`` says why and the graph is built. ``None`` for both: always built,
    nothing written.

    ``dump_dir``: each stage's graph is written there as text (``01-capture.txt``, ...); a graph
    loaded from the build cache is written as ``01-load.txt``.

    ``fuse_projections``: q|k|v and gate|up become one GEMM each on concatenated weights
    (``runtime/lower/fuse_projections.py``), after the build cache stored or loaded the graph, so
    cache entries keep the original parameters.

    ``decode_gemms``: projections whose shape has a tuned weight-stream kernel for this GPU run
    ``adp.decode_mm`` (``runtime/lower/decode_mm.py``; cuBLAS above 64 rows and elsewhere).

    ``prefetch_weights``: on CUDA, each projection's weight is prefetched into L2 while the
    kernels before it run (``runtime/lower/prefetch_weights.py``); a hint that changes no value.
    Off by default: on the H200 it made the Qwen3-8B decode step slower (docs/lowering.md).

    ``fp8_linears``: how an FP8 block-scaled ``checkpoint`` (its config.json's fp8
    ``quantization_config``) is served. ``None`` (default) or ``True``: in FP8, the captured
    graph's decoder projections become ``adp.fp8_block_linear`` on the checkpoint's fp8 weights
    and scales, loaded as stored (``adp_pass/fp8_linears.py``, docs/fp8.md "Serving an FP8
    checkpoint"); ``False``: the bf16 graph, the checkpoint dequantized to ``dtype`` at load.
    ``True`` with an unquantized checkpoint (or none) is a ``ValueError``. The build-cache key
    tells the two graphs apart.
    """
    serving = serving or ServingConfig()
    num_blocks = serving.num_blocks if num_blocks is None else num_blocks
    block_size = serving.block_size if block_size is None else block_size
    max_position = serving.max_position if max_position is None else max_position
    cache_dtype = serving.kv_cache_torch_dtype(dtype)  # a named error before any work
    fp8_cache = cache_dtype != dtype
    # An fp8 cache replaces the built graph's after the build: that one is a placeholder of one
    # block, so the run-dtype cache is never allocated at full size.
    built_blocks = 1 if fp8_cache else num_blocks
    mapping = Mapping.load(mapping)
    mapping.check_model(
        config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    )
    device = torch.device(device)
    fp8_weights = _fp8_weights(checkpoint, fp8_linears)  # validated before any capture
    # Each rank's cache holds its attention group's share of the kv heads.
    kv_heads = config.num_key_value_heads // mapping.attn_tp_size
    from adp_pass.runtime.weights import kv_cache_bytes

    kv_bytes = kv_cache_bytes(config.num_hidden_layers, kv_heads, config.head_dim, num_blocks,
                              block_size, cache_dtype)
    # A loaded entry is checked before its KV cache is allocated, as a build before rewrite.
    geometry = dict(device=device, num_blocks=built_blocks, block_size=block_size,
                    max_position=max_position,
                    check=lambda plan: _check_memory(plan, kv_bytes, device, dtype))
    pipeline = Pipeline(dump_dir, progress=progress)
    status, note, path, loaded, key = "off", "", None, None, None
    if cache_dir is not None or artifact is not None:
        from adp_pass.runtime import build_cache

        key = build_cache.build_key(config, mapping, rank, dtype=dtype, device=device,
                                    lower_ops=lower_ops, fp8_linears=bool(fp8_weights))
        start = time.perf_counter()
        if artifact is not None:
            try:
                loaded = build_cache.load_entry(artifact, key, **geometry)
                status, path = "hit", str(artifact)
            except build_cache.EntryError as err:
                status, note = err.status, f"artifact {artifact}: {err}"
                warnings.warn(f"build cache: {note}; building the rank instead",
                              build_cache.BuildCacheWarning, stacklevel=2)
        if loaded is None and cache_dir is not None:
            found = build_cache.lookup(cache_dir, key, **geometry)
            loaded, path = found.built, str(found.path)
            if found.status != "miss" or not note:
                status, note = found.status, found.reason or note
        if loaded is not None:
            pipeline.loaded(loaded.model, time.perf_counter() - start)

    if loaded is not None:
        gm, plan, build_reports = loaded.model, loaded.plan, loaded.reports
    else:
        gm, plan = _capture_and_rewrite(config, mapping, rank, device, dtype, kv_bytes,
                                        pipeline=pipeline, fp8_weights=fp8_weights)
    pipeline.weights(gm, lambda module: _fill_weights(module, plan, config, checkpoint, device,
                                                      dtype, seed))
    if loaded is None:
        gm = finish_graph(gm, plan, device=device, dtype=dtype, num_blocks=built_blocks,
                          block_size=block_size, max_position=max_position,
                          lower_ops=lower_ops, pipeline=pipeline)
        build_reports = dict(pipeline.reports)
        if cache_dir is not None:
            try:
                path = str(pipeline.store(lambda: build_cache.store(cache_dir, key, gm, plan,
                                                                    reports=build_reports)))
            except Exception as err:  # noqa: BLE001 - a cache that fails never fails the rank
                path = None
                note = f"{note}; " if note else ""
                note += f"not stored: {err}"
                warnings.warn(f"build cache: rank {rank}'s build not stored in {cache_dir}: "
                              f"{err}", build_cache.BuildCacheWarning, stacklevel=2)
    scales = (None, None)
    if fp8_cache:
        from adp_pass.runtime.cache_insertion import kv_cache_scales, use_fp8_kv_cache

        use_fp8_kv_cache(gm, num_blocks=num_blocks, kv_scale=serving.kv_cache_scale)
        scales = tuple(zip(*kv_cache_scales(gm)))
    if lower_ops:  # the rank passes match lowered graphs only
        if fuse_projections:
            gm = pipeline.fuse_projections(gm)
        if decode_gemms:
            gm = pipeline.decode_mm(gm)
        if prefetch_weights:
            gm = pipeline.prefetch_weights(gm, device)
    if fp8_weights and device.type == "cuda":
        from adp_pass.runtime.kernels.fp8_gemm import scaled_mm_available

        # Asked here, eagerly: a CUDA-graph capture may not run the probe, and a graph captured
        # before it would keep the Triton picks where cuBLAS is faster.
        scaled_mm_available(device)
    layers = range(config.num_hidden_layers)
    cache = PagedKVCache.over(
        [gm.get_buffer(f"kv_cache_{i}_k") for i in layers],
        [gm.get_buffer(f"kv_cache_{i}_v") for i in layers],
        *scales,
    )
    # A hit's lowering and cache counts are those of the build it stored.
    counts = rank_counts(plan, {**build_reports, **pipeline.reports})
    return RankModel(gm, cache, plan, stage_timings(pipeline.reports), counts, status, path,
                     note, dict(pipeline.reports), build_reports)


def _fp8_weights(checkpoint, fp8_linears: bool | None) -> list[str]:
    """The checkpoint's fp8 weights when the rank serves them in FP8, else none (the bf16
    graph: the loader dequantizes them)."""
    if fp8_linears is False:
        return []
    names: list[str] = []
    if checkpoint is not None:
        from adp_pass.checks import CheckpointInvalid
        from adp_pass.fp8_linears import checkpoint_fp8_weights
        from adp_pass.runtime.weights import CheckpointError

        try:
            names = checkpoint_fp8_weights(checkpoint)
        except CheckpointInvalid as err:  # reported as the loader reports it
            fix = f"; fix: {err.hint}" if err.hint else ""
            raise CheckpointError(f"{err}{fix}", hint=err.hint) from None
    if fp8_linears and not names:
        raise ValueError(f"fp8_linears=True needs an FP8 block-scaled checkpoint, but "
                         f"{checkpoint or 'no checkpoint'} has no fp8 weights; quantize one with "
                         "`adp quantize`, or leave fp8_linears at None")
    return names


def _capture_and_rewrite(config, mapping: Mapping, rank: int, device: torch.device,
                         dtype: torch.dtype, kv_bytes: int | None, *, pipeline: Pipeline,
                         fp8_weights: list[str] | None = None,
                         ) -> tuple[torch.fx.GraphModule, Plan]:
    # Traced on the target device (not meta): SDPA then stays one op per layer.
    captured = pipeline.capture(
        lambda: capture_hf(config, mapping.tp_size, rank, dtype=dtype, device=device,
                           stamped_device="meta"))
    if fp8_weights:  # before detect: the sharding analysis shards the scales with the weights
        pipeline.fp8_linears(captured.gm, fp8_weights)
    plan = pipeline.detect(captured.gm, mapping)
    # Before rewrite allocates the rank's weights: refused with the numbers and a mapping that
    # fits.
    if kv_bytes is not None:
        _check_memory(plan, kv_bytes, device, dtype)
    gm = pipeline.rewrite(captured.gm, plan)
    return gm, plan


def build_artifact(
    config: Qwen3Config,
    mapping: Mapping | str,
    rank: int,
    cache_dir: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_position: int = ServingConfig.max_position,
    lower_ops: bool = True,
    rewritten: tuple[torch.fx.GraphModule, Plan] | None = None,
    pipeline: Pipeline | None = None,
    fp8_weights: list[str] | None = None,
) -> Path:
    """Build rank ``rank``'s graph as :func:`prepare_rank` does (no weights, no KV cache worth
    the name) and store it as the build-cache entry under ``cache_dir`` that ``prepare_rank(...,
    cache_dir=cache_dir)`` loads, or ``artifact=<the returned path>``. ``rewritten``: ``(gm,
    plan)`` of a rewrite of exactly that capture (same config, tp, rank, dtype, device), to
    skip the capture; ``gm`` is lowered in place. ``pipeline``: the runner whose stages led to
    ``rewritten`` (its reports and dumps continue); a new one if not given. ``fp8_weights``: an
    FP8 checkpoint's fp8 weight names (as ``prepare_rank`` reads them): the graph gets FP8 linears
    and the entry the key ``prepare_rank`` looks up for that checkpoint."""
    from adp_pass.runtime import build_cache

    mapping = Mapping.load(mapping)
    device = torch.device(device)
    pipeline = pipeline or Pipeline()
    if rewritten is None:
        gm, plan = _capture_and_rewrite(config, mapping, rank, device, dtype, None,
                                        pipeline=pipeline, fp8_weights=fp8_weights)
    else:
        gm, plan = rewritten
    # The KV-cache geometry is not part of the graph: a loaded entry gets the caller's.
    gm = finish_graph(gm, plan, device=device, dtype=dtype, num_blocks=2,
                      block_size=ServingConfig.block_size, max_position=max_position,
                      lower_ops=lower_ops, pipeline=pipeline)
    key = build_cache.build_key(config, mapping, rank, dtype=dtype, device=device,
                                lower_ops=lower_ops, fp8_linears=bool(fp8_weights))
    build = dict(pipeline.reports)
    return pipeline.store(lambda: build_cache.store(cache_dir, key, gm, plan, reports=build))


def finish_graph(
    gm: torch.fx.GraphModule,
    plan: Plan,
    *,
    device: torch.device,
    dtype: torch.dtype,
    num_blocks: int = ServingConfig.num_blocks,
    block_size: int = ServingConfig.block_size,
    max_position: int = ServingConfig.max_position,
    lower_ops: bool = True,
    pipeline: Pipeline | None = None,
) -> torch.fx.GraphModule:
    """Lower a rewritten graph to the Triton ops and insert its paged KV cache (in place).
    ``pipeline`` records both stages (a new one if not given)."""
    pipeline = pipeline or Pipeline()
    if lower_ops:
        gm = pipeline.lower(gm, max_position=max_position)
    return pipeline.insert_cache(gm, num_blocks=num_blocks, block_size=block_size,
                                 device=device, dtype=dtype)


def _check_memory(plan: Plan, kv_bytes: int, device: torch.device, dtype: torch.dtype) -> None:
    from adp_pass.runtime.weights import check_memory

    check_memory(plan, kv_cache_bytes=kv_bytes, device=device, dtype=dtype)


def _fill_weights(gm, plan: Plan, config, checkpoint, device, dtype, seed: int) -> None:
    from adp_pass.runtime.weights import load_checkpoint, random_weights

    if checkpoint is not None:
        load_checkpoint(gm, plan, checkpoint, device=device, dtype=dtype)
    else:
        random_weights(gm, plan, seed=seed, device=device, dtype=dtype, config=config)
