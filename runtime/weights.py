"""Weights for one rank, through the plan: checkpoint loading, a memory check, random init.

Every tensor is addressed by its ``ParamSpec``: a tensor the module holds at the plan's full
shape is read whole; a tensor it holds at ``local_shape`` while the layout is sharded (a
TP-MLP mapping) is read as this rank's ranges only (``ParamSpec.shard_ranges``), through
``safe_open(...).get_slice``. See docs/weights.md.

An FP8 block-scaled checkpoint (docs/fp8.md) is validated from its headers. Into an FP8 graph
(its linears ``adp::fp8_block_linear``, the weight parameters float8_e4m3fn) each rank reads its
ranges of every fp8 weight as fp8 and its ranges of the 128 x 128 scale tiles into the scale
parameter beside it (the plan shards the scales with their weights). Into a bf16 graph it reads
the same ranges and dequantizes them to the run dtype. Never an fp8 tensor without its scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from adp_pass import fp8
from adp_pass.plan import ParamSpec, Plan
from adp_pass.attributes import owner_of
from adp_pass.checks import CheckpointInvalid, SCALE_SUFFIX, check_quantization, header_entries
from adp_pass.runtime.kv_cache import PagedKVCache
from adp_pass.errors import AdpError

_GIB = 1024**3
_INV_FREQ = "rotary_emb.inv_freq"


class CheckpointError(AdpError, RuntimeError):
    """The checkpoint cannot fill this graph; the message says why and what to do."""


class InsufficientMemory(AdpError, RuntimeError):
    """The replicated weights plus the KV cache do not fit the device."""


@dataclass
class LoadReport:
    files: list[str]
    tensors: int
    bytes_read: int
    seconds: float
    sliced: list[str] = field(default_factory=list)  # read as this rank's shard only
    derived: list[str] = field(default_factory=list)  # non-persistent buffers: not in a checkpoint
    unused: list[str] = field(default_factory=list)  # checkpoint tensors nothing asked for
    fp8: list[str] = field(default_factory=list)  # fp8 weights, read with their scales
    dequantized_to: str | None = None  # the dtype the fp8 weights were dequantized to
    kept_fp8: bool = False  # an FP8 graph: fp8 weights and their scales loaded as they are

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        text = (
            f"loaded {self.tensors} tensors ({_size(self.bytes_read)}) from {len(self.files)} "
            f"files in {self.seconds:.1f} s ({self.mb_per_s:.0f} MB/s); {len(self.sliced)} read "
            f"as shards, {len(self.derived)} derived, {len(self.unused)} unused"
        )
        if self.fp8 and self.kept_fp8:
            text += f", {len(self.fp8)} FP8 weights kept in FP8 with their scales"
        elif self.fp8:
            text += f", {len(self.fp8)} FP8; {_dequantized_note(self.dequantized_to)}"
        return text


def _dequantized_note(dtype: str | None) -> str:
    # tests/test_quantize.py pins this wording; "not wired" now means: not in this (bf16) graph
    return f"FP8 weights dequantized to {dtype} at load: the FP8 GEMM path is not wired yet"


def load_checkpoint(
    gm: torch.nn.Module,
    plan: Plan,
    checkpoint_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> LoadReport:
    """Fill every parameter and persistent buffer of ``gm`` from a Hugging Face safetensors
    checkpoint, reading only what this rank holds. ``device``/``dtype`` default to each tensor's
    current ones (cpu for meta tensors); ``dtype`` applies to floating-point tensors only.

    Everything is validated (config.json, missing tensors, shapes, an FP8 checkpoint's scales
    and this rank's 128-block boundaries) before anything is read. An FP8 graph's fp8 weights and
    scales are read as stored (fp8 stays fp8, a scale takes its parameter's dtype; ``dtype``
    applies to neither); into a bf16 graph, FP8 weights are dequantized (fp8 x tile scale in
    float32) and cast to the run dtype as they are read.
    """
    start = time.perf_counter()
    root = Path(checkpoint_dir)
    files = _safetensors_files(root)
    config = _read_config(root)
    if config is not None:
        _check_config(config, plan, root)
    fp8_names = set(_check_quantization(root, files))
    stored, derived = _split_specs(gm, plan)
    with contextlib.ExitStack() as stack:
        # Each file is opened (mmapped) once; its header answers every validation question.
        handles = {f.name: stack.enter_context(safe_open(str(f), "pt")) for f in files}
        where = {key: name for name, handle in handles.items() for key in handle.keys()}
        jobs = _plan_reads(gm, stored, handles, where, root, fp8_names)
        _check_fp8_blocks(jobs, plan)
        quantized = [job for job in jobs if job.scale is not None]
        kept = [job for job in jobs if job.raw_fp8]
        run_dtype = (str(_target(_get(gm, quantized[0].spec.name), device, dtype)[1])
                     .removeprefix("torch.") if quantized else None)
        meter = Progress(len(jobs), sum(job.nbytes for job in jobs), enabled=progress)
        for name, handle in handles.items():
            for job in (j for j in jobs if j.file == name):
                tensor = _read(handle, job, plan, handles,
                               _target(_get(gm, job.spec.name), device, dtype)[0])
                _put(gm, job.spec, tensor, device, None if job.keep_dtype else dtype)
                del tensor  # a dequantized weight is float32: let it go before the next one
                meter.advance(job.nbytes)
        meter.close()
        if quantized:
            meter.note(f"{_dequantized_note(run_dtype)} ({len(quantized)} tensors)")
    _derive_buffers(gm, derived, config, device)
    used = {job.key for job in jobs} | {job.scale for job in quantized}
    return LoadReport(
        files=[f.name for f in files],
        tensors=len(jobs),
        bytes_read=meter.done_bytes,
        seconds=time.perf_counter() - start,
        sliced=[job.spec.name for job in jobs if job.shard],
        derived=[spec.name for spec in derived],
        unused=sorted(set(where) - used),
        fp8=[job.spec.name for job in quantized + kept],
        dequantized_to=run_dtype,
        kept_fp8=bool(kept),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    rank: int
    device: str
    weights_bytes: int
    kv_cache_bytes: int
    free_bytes: int
    headroom: float

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes

    @property
    def usable_bytes(self) -> int:
        return int(self.free_bytes * self.headroom)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def __str__(self) -> str:
        return (
            f"rank {self.rank} needs {_gib(self.total_bytes)} (weights "
            f"{_gib(self.weights_bytes)} + KV cache {_gib(self.kv_cache_bytes)}); "
            f"{self.device} has {_gib(self.free_bytes)} free, {_gib(self.usable_bytes)} usable "
            f"at headroom {self.headroom}"
        )


def kv_cache_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
    dtype: torch.dtype,
) -> int:
    """Bytes of a rank's paged KV cache (k and v of every layer), as ``PagedKVCache`` allocates."""
    return PagedKVCache.bytes_needed(
        num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype
    )


def check_memory(
    plan: Plan,
    *,
    kv_cache_bytes: int,
    device: torch.device | str,
    headroom: float = 0.9,
    dtype: torch.dtype | None = None,
    free_bytes: int | None = None,
) -> MemoryEstimate:
    """Check that the full (replicated) weights plus the KV cache fit ``headroom`` of the device's
    free memory; raise :class:`InsufficientMemory` if not. ``dtype`` is the weights' dtype when it
    differs from the traced one; ``free_bytes`` overrides the device query (tests, planning)."""
    device = _resolve_device(device)
    sizes = {p.name: math.prod(p.held_shape) * _itemsize(p, dtype) for p in plan.params}
    estimate = MemoryEstimate(
        rank=plan.rank,
        device=str(device),
        weights_bytes=sum(sizes.values()),
        kv_cache_bytes=kv_cache_bytes,
        free_bytes=_free_bytes(device) if free_bytes is None else free_bytes,
        headroom=headroom,
    )
    if estimate.fits:
        return estimate
    fits = _mapping_that_fits(plan, sizes, kv_cache_bytes, estimate.usable_bytes)
    fixes = "lower max batch/context (a smaller KV cache)"
    if fits is not None:
        fixes += f", or use mapping {fits[0]} ({_gib(fits[1])} per rank)"
    raise InsufficientMemory(
        f"{estimate} under mapping {plan.mapping}: by "
        f"{_gib(estimate.total_bytes - estimate.usable_bytes)} too little; {fixes}"
    )


def mapping_bytes(plan: Plan, mapping, sizes: dict[str, int]) -> int:
    """Weight bytes per rank if ``plan``'s graph were rewritten to ``mapping`` instead, from
    ``sizes``: each parameter's bytes as ``plan`` holds it."""
    from adp_pass.mapping import role_parts

    parts = role_parts(mapping)
    return sum(sizes[p.name] * p.parts // parts[p.role] if p.role else sizes[p.name]
               for p in plan.params)


def _mapping_that_fits(plan: Plan, sizes: dict[str, int], kv_bytes: int,
                       usable: int) -> tuple[str, int] | None:
    """The mapping with the fewest collectives whose weights + KV cache fit ``usable`` bytes;
    the KV cache shrinks with attn_tp (each rank holds 1/attn_tp of the kv heads)."""
    from adp_pass.mapping import Mapping, MappingError

    tp = plan.mapping.tp_size
    current_attn = plan.mapping.attn_tp_size
    divisors = [d for d in range(1, tp + 1) if tp % d == 0]
    for attn in divisors:
        for mlp in divisors:
            try:
                candidate = Mapping(tp_size=tp, enable_attention_dp=True, attn_tp_size=attn,
                                    mlp_tp_size=mlp)
            except MappingError:
                continue
            total = mapping_bytes(plan, candidate, sizes) + kv_bytes * current_attn // attn
            if total <= usable:
                return str(candidate), total
    return None


def random_weights(
    gm: torch.nn.Module,
    plan: Plan,
    *,
    seed: int = 0,
    std: float = 0.02,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: PretrainedConfig | None = None,
) -> None:
    """Fill ``gm`` with seeded random weights: matrices ~ N(0, std), 1-D weights (norms) ~
    N(1, std). Each tensor's generator is seeded from ``seed`` and its name, and a sharded tensor
    is cut from the full one, so every rank holds the same model. Meta tensors are materialised
    on ``device`` (default: their own, cpu for meta); a meta rotary ``inv_freq`` needs the
    model's ``config`` (e.g. ``qwen3_config(preset)``) to be recomputed."""
    stored, derived = _split_specs(gm, plan)
    scales = _fp8_graph_scales(gm, stored)
    by_name = {spec.name: spec for spec in stored}
    for spec in stored:
        if spec.name in scales.values():
            continue  # drawn with its weight
        if spec.name in scales:
            _random_fp8(gm, plan, spec, by_name[scales[spec.name]], seed, std, device)
            continue
        current = _get(gm, spec.name)
        target, kind = _target(current, device, dtype)
        full = random_tensor(spec.name, spec.full_shape, seed=seed, std=std, dtype=kind,
                             device=target)
        if _wants_shard(spec, tuple(current.shape)):
            full = spec.held_part(full, plan.rank)
        _put(gm, spec, full, target, kind)
    _derive_buffers(gm, derived, config, device)


def _random_fp8(gm: torch.nn.Module, plan: Plan, spec: ParamSpec, scale: ParamSpec, seed: int,
                std: float, device) -> None:
    """An FP8 graph's weight and its scales: the full random tensor quantized as ``adp quantize
    --preset`` writes it (bf16 scales), then this rank's part of each; so the random FP8 model
    is the one that checkpoint holds. Both keep the graph's dtypes."""
    full = random_tensor(spec.name, spec.full_shape, seed=seed, std=std)
    weight, scales = fp8.quantize_weight_stored(full, torch.bfloat16)
    for part, value in ((spec, weight), (scale, scales)):
        current = _get(gm, part.name)
        target, _ = _target(current, device, None)
        if _wants_shard(part, tuple(current.shape)):
            value = part.held_part(value, plan.rank)
        _put(gm, part, value.to(target), target, None)


def random_tensor(name: str, shape: tuple[int, ...], *, seed: int = 0, std: float = 0.02,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The full tensor ``name`` of the seeded random model (``random_weights``): a generator
    seeded from ``seed`` and the name, N(1, std) for 1-D tensors, N(0, std) otherwise. One
    definition, so ``adp quantize --preset`` writes the model every rank builds."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 2**32 + zlib.crc32(name.encode())) % 2**63)
    full = torch.empty(shape, dtype=dtype, device=device)
    return full.normal_(1.0 if full.dim() == 1 else 0.0, std, generator=generator)


# ----------------------------------------------------------------------------- checkpoint files
@dataclass(frozen=True)
class _Read:
    spec: ParamSpec
    key: str  # the name found in the checkpoint (the spec's name or an alias)
    file: str
    shard: bool
    nbytes: int  # bytes read from disk: this rank's part (with its scale tiles for fp8)
    scale: str | None = None  # an fp8 weight's weight_scale_inv, read and applied with it
    scale_file: str | None = None
    raw_fp8: bool = False  # an FP8 graph's fp8 weight: read as stored, its scale a job of its own
    keep_dtype: bool = False  # fp8 weights and their scales keep the graph's dtype


def _safetensors_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist or is not a directory")
    index = root / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [n for n in names if not (root / n).is_file()]
        if absent:
            raise CheckpointError(
                f"{index} lists shards that are not in {root}: {', '.join(absent[:5])}; the "
                "download is incomplete: fetch the missing files"
            )
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        raise CheckpointError(
            f"no *.safetensors files in {root} (it holds: {found}); save the model with "
            "save_pretrained(dir, safe_serialization=True), or convert .bin/.pt weights to "
            "safetensors"
        )
    return files


def _check_quantization(root: Path, files: list[Path]) -> list[str]:
    """Validate how the checkpoint is quantized from config.json and the headers (the CLI's
    check, adp_pass/checks.py); the fp8 weights' names. Truncated files are named here too."""
    try:
        entries = {}
        for path in files:
            entries.update(header_entries(path, None))
        raw = None
        if (root / "config.json").is_file():
            raw = json.loads((root / "config.json").read_text())
        return check_quantization(raw if isinstance(raw, dict) else None, entries, root, None)
    except CheckpointInvalid as err:  # the loader's own class, as its other checks raise
        fix = f"; fix: {err.hint}" if err.hint else ""
        raise CheckpointError(f"{err}{fix}", hint=err.hint) from None


def _read_config(root: Path) -> PretrainedConfig | None:
    if not (root / "config.json").is_file():
        return None
    return AutoConfig.from_pretrained(root)


def _check_config(config: PretrainedConfig, plan: Plan, root: Path) -> None:
    """Compare config.json with what the plan's full shapes say about the model."""
    specs = {p.name: p for p in plan.params}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    from_config = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "tie_word_embeddings": getattr(config, "tie_word_embeddings", False),
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads*head_dim": config.num_attention_heads * head_dim,
        "num_key_value_heads*head_dim": config.num_key_value_heads * head_dim,
        "intermediate_size": getattr(config, "intermediate_size", None),
    }
    from_graph: dict[str, object] = {}
    if embed := specs.get("model.embed_tokens.weight"):
        from_graph["vocab_size"], from_graph["hidden_size"] = embed.full_shape
        from_graph["tie_word_embeddings"] = "lm_head.weight" in embed.aliases
    layers = {n.split(".")[2] for n in specs if n.startswith("model.layers.")}
    if layers:
        from_graph["num_hidden_layers"] = len(layers)
    for key, weight in [("num_attention_heads*head_dim", "self_attn.q_proj"),
                        ("num_key_value_heads*head_dim", "self_attn.k_proj"),
                        ("intermediate_size", "mlp.gate_proj")]:
        if spec := specs.get(f"model.layers.0.{weight}.weight"):
            from_graph[key] = spec.full_shape[0]
    wrong = [f"{k} {from_config[k]} (graph {v})" for k, v in from_graph.items()
             if from_config[k] != v]
    if wrong:
        raise CheckpointError(
            f"{root / 'config.json'} disagrees with the graph: {', '.join(wrong)}; the graph "
            "was captured from a different config: capture it from "
            f"AutoConfig.from_pretrained('{root}'), or load the checkpoint it was made for"
        )


def _plan_reads(
    gm: torch.nn.Module, specs: list[ParamSpec], handles: dict, where: dict[str, str], root: Path,
    fp8_names: set[str] = frozenset(),
) -> list[_Read]:
    reads, missing, wrong = [], [], []
    scales = _fp8_graph_scales(gm, specs)
    for spec in specs:
        key = next((a for a in (spec.name, *spec.aliases) if a in where), None)
        if key is None:
            missing.append(" / ".join(dict.fromkeys((spec.name, *spec.aliases))))
            continue
        piece = handles[where[key]].get_slice(key)
        found = tuple(piece.get_shape())
        if found != spec.full_shape:
            wrong.append(
                f"{key} in {where[key]}: expected {list(spec.full_shape)}, found {list(found)}"
            )
            continue
        shard = _wants_shard(spec, tuple(_get(gm, spec.name).shape))
        held = spec.held_shape if shard else found
        nbytes = math.prod(held) * _bits(piece.get_dtype()) // 8
        scale = None
        if spec.name in scales or spec.name in scales.values():  # an FP8 graph's pair
            if spec.name in scales and key not in fp8_names:
                raise CheckpointError(
                    f"{spec.name} is float8_e4m3fn in the graph (an FP8 linear) but {key} in "
                    f"{where[key]} is {piece.get_dtype()}: the graph needs an FP8 block-scaled "
                    "checkpoint (adp quantize writes one), or capture the bf16 model for this "
                    "checkpoint")
            reads.append(_Read(spec, key, where[key], shard, nbytes, raw_fp8=spec.name in scales,
                               keep_dtype=True))
            continue
        if key in fp8_names:  # validated: its scale is there, of the ceil grid
            scale = key + SCALE_SUFFIX
            tiles = fp8.scale_shape(held)
            nbytes += math.prod(tiles) * _bits(handles[where[scale]].get_slice(scale).get_dtype()) // 8
        reads.append(_Read(spec, key, where[key], shard, nbytes, scale,
                           where[scale] if scale else None))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{len(missing)} tensors the graph needs are not in the checkpoint: "
            f"{', '.join(missing[:5])}{more} (searched {', '.join(sorted(handles))} in {root}); "
            "the checkpoint is of another model or incomplete: load the one the graph was "
            "captured for"
        )
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} tensors have a shape other than the plan's full shape: "
            f"{'; '.join(wrong[:5])}; was this checkpoint saved from a different config? Capture "
            "the graph from the checkpoint's config.json"
        )
    return reads


def _fp8_graph_scales(gm: torch.nn.Module, specs: list[ParamSpec]) -> dict[str, str]:
    """``{fp8 weight: its scale}`` of an FP8 graph (weight parameters float8_e4m3fn). Each fp8
    weight must have its ``weight_scale_inv`` beside it in the plan, of the tile grid of the
    weight's shape: an fp8 tensor is never loaded without its scale."""
    names = {spec.name for spec in specs}
    pairs = {}
    for spec in specs:
        tensor = _get(gm, spec.name)
        if tensor.dtype != fp8.E4M3:
            continue
        scale = spec.name + SCALE_SUFFIX
        if scale not in names:
            raise CheckpointError(
                f"{spec.name} is float8_e4m3fn in the graph but the plan has no {scale} beside "
                "it: an fp8 weight cannot be loaded without its scales; capture the FP8 model "
                "whose linears hold weight_scale_inv (adp::fp8_block_linear)")
        want = fp8.scale_shape(tuple(tensor.shape))
        if tuple(_get(gm, scale).shape) != want:
            raise CheckpointError(
                f"{scale} is {list(_get(gm, scale).shape)} in the graph; its weight "
                f"{spec.name} {list(tensor.shape)} needs {list(want)} (one per 128x128 tile): "
                "the plan was made for another graph; run detect (and rewrite) on this one")
        pairs[spec.name] = scale
    return pairs


def _bits(dtype: str) -> int:
    bits = re.search(r"\d+", dtype)  # "BF16" -> 16, "F8_E4M3" -> 8; "BOOL" has none: one byte
    return int(bits.group() if bits else 8)


def _read(handle, job: _Read, plan: Plan, handles: dict, device: torch.device) -> torch.Tensor:
    if job.scale is not None:
        return _read_fp8(handle, job, plan, handles, device)
    if not job.shard:
        return handle.get_tensor(job.key)
    piece, spec = handle.get_slice(job.key), job.spec
    lead = (slice(None),) * spec.dim
    ranges = spec.held_ranges(plan.rank)
    return torch.cat([piece[lead + (slice(s, s + n),)] for s, n in ranges], dim=spec.dim)


def _read_fp8(handle, job: _Read, plan: Plan, handles: dict, device: torch.device
              ) -> torch.Tensor:
    """This rank's part of an fp8 weight, dequantized to float32 on ``device`` (one byte per
    value crosses to a GPU, not four): each held range with the scale tiles of its rows (or
    columns). ``_check_fp8_blocks`` made every range start on a tile. e4m3 x a bf16/fp16 scale
    is exact in float32 (4 by 8 or 11 significant bits) and an fp32 scale rounds once, so where
    it is computed changes no bit."""
    scale_handle = handles[job.scale_file]
    if not job.shard:
        return fp8.dequantize_weight(handle.get_tensor(job.key).to(device),
                                     scale_handle.get_tensor(job.scale).to(device))
    weight, scales, spec = handle.get_slice(job.key), scale_handle.get_slice(job.scale), job.spec
    block = fp8.WEIGHT_BLOCK[spec.dim]
    lead = (slice(None),) * spec.dim
    parts = []
    for start, length in spec.held_ranges(plan.rank):
        tiles = slice(start // block, math.ceil((start + length) / block))
        parts.append(fp8.dequantize_weight(weight[lead + (slice(start, start + length),)].to(device),
                                           scales[lead + (tiles,)].to(device)))
    return torch.cat(parts, dim=spec.dim)


def _block_misfit(spec: ParamSpec, parts: int, ranks) -> tuple[int, int, int] | None:
    """``(rank, start, length)`` of the first range of ``spec`` split ``parts`` ways that does
    not begin and end on a 128 boundary (its end may be the tensor's end: a partial last tile)."""
    probe = dataclasses.replace(spec, parts=parts)
    full = spec.full_shape[spec.dim]
    block = fp8.WEIGHT_BLOCK[spec.dim]
    for rank in ranks:
        for start, length in probe.held_ranges(rank):
            end = start + length
            if start % block or (end % block and end != full):
                return rank, start, length
    return None


def _check_fp8_blocks(jobs: list[_Read], plan: Plan) -> None:
    """Before any read: this rank's part of every fp8 weight is whole 128-row/column tiles, or
    its scale grid would not line up. Names the tensor and the mappings that would work."""
    for job in jobs:
        if (job.scale is None and not job.raw_fp8) or not job.shard:
            continue
        spec = job.spec
        misfit = _block_misfit(spec, spec.parts, [plan.rank])
        if misfit is None:
            continue
        rank, start, length = misfit
        what = "rows" if spec.dim == 0 else "columns"
        raise CheckpointError(
            f"{spec.name} is FP8 with 128x128 scale blocks, but under mapping {plan.mapping} "
            f"rank {rank} holds its {what} {start}..{start + length} of "
            f"{spec.full_shape[spec.dim]} (split {spec.parts} ways), which do not start and end "
            f"on a multiple of 128: a rank must hold whole blocks. "
            f"{_fp8_mappings(jobs, plan)}; or load the bf16 checkpoint"
        )


def _fp8_mappings(jobs: list[_Read], plan: Plan) -> str:
    """Which mappings of this TP job keep every rank on whole blocks of every fp8 weight."""
    from adp_pass.mapping import Mapping, MappingError, role_parts

    tp = plan.mapping.tp_size
    specs = [j.spec for j in jobs if (j.scale is not None or j.raw_fp8) and j.spec.dim is not None
             and j.spec.role]
    divisors = [d for d in range(1, tp + 1) if tp % d == 0]
    candidates = [Mapping(tp_size=tp)]
    for attn in divisors:
        for mlp in divisors:
            with contextlib.suppress(MappingError):
                candidates.append(Mapping(tp_size=tp, enable_attention_dp=True,
                                          attn_tp_size=attn, mlp_tp_size=mlp))
    works = [str(c) for c in candidates
             if all(_block_misfit(s, role_parts(c)[s.role], range(tp)) is None for s in specs)]
    limits = []
    for role, key in (("attention", "attn_tp"), ("mlp", "mlp_tp")):
        ok = [d for d in divisors
              if all(_block_misfit(s, d, range(tp)) is None for s in specs if s.role == role)]
        limits.append(f"{key} {', '.join(map(str, ok))}")
    return (f"Mappings of tp={tp} that keep whole blocks: {'; '.join(works) or 'none'} "
            f"(whole blocks with {' and with '.join(limits)})")


# ----------------------------------------------------------------------------- module tensors
def _split_specs(gm: torch.nn.Module, plan: Plan) -> tuple[list[ParamSpec], list[ParamSpec]]:
    """(parameters and persistent buffers, non-persistent buffers such as rotary inv_freq)."""
    stored, derived = [], []
    for spec in plan.params:
        owner, leaf = owner_of(gm, spec.name)
        (derived if leaf in owner._non_persistent_buffers_set else stored).append(spec)
    return stored, derived


def _derive_buffers(
    gm: torch.nn.Module, specs: list[ParamSpec], config: PretrainedConfig | None, device
) -> None:
    """Non-persistent buffers are computed, never saved: move them, or recompute a meta one."""
    for spec in specs:
        value = _get(gm, spec.name)
        if value.device.type == "meta":
            if not spec.name.endswith(_INV_FREQ) or config is None:
                raise CheckpointError(
                    f"{spec.name} is a non-persistent buffer on the meta device, so no checkpoint "
                    "holds it; give the model config (config.json / config=) to recompute rotary "
                    "inv_freq, or capture without meta=True"
                )
            from adp_pass.families import family_of

            value = family_of(config).rotary_inv_freq(config)  # the family's rotary class
            if tuple(value.shape) != spec.full_shape:
                raise CheckpointError(
                    f"{spec.name}: the config gives {list(value.shape)}, the graph holds "
                    f"{list(spec.full_shape)}; the config's head_dim is not the graph's"
                )
        _put(gm, spec, value, device, None)


def _put(gm: torch.nn.Module, spec: ParamSpec, value: torch.Tensor, device, dtype) -> None:
    current = _get(gm, spec.name)
    device, dtype = _target(current, device, dtype)
    if current.device.type != "meta" and (current.shape, current.device, current.dtype) == (
        value.shape, device, dtype
    ):
        # In place, so whatever already holds this tensor (compiled code, a CUDA graph) sees it.
        with torch.no_grad():
            current.copy_(value)
        return
    new = value.to(device=device, dtype=dtype)
    if isinstance(current, torch.nn.Parameter):
        new = torch.nn.Parameter(new, requires_grad=False)
    for alias in spec.aliases:  # one object under every name keeps tied weights tied
        owner, leaf = owner_of(gm, alias)
        if isinstance(new, torch.nn.Parameter):
            owner.register_parameter(leaf, new)
        else:
            persistent = leaf not in owner._non_persistent_buffers_set
            owner.register_buffer(leaf, new, persistent=persistent)


def _wants_shard(spec: ParamSpec, shape: tuple[int, ...]) -> bool:
    """Whether the module holds this rank's part of the tensor (a mapping that keeps it
    sharded: TP, mlp_tp, attn_tp) rather than the whole."""
    if shape == spec.full_shape:
        return False
    if spec.layout != "replicated" and shape == spec.held_shape:
        return True
    raise CheckpointError(
        f"{spec.name} is {list(shape)} in the module, neither the plan's full shape "
        f"{list(spec.full_shape)} nor this rank's part {list(spec.held_shape)} under mapping: "
        "the plan was made for another graph; run detect (and rewrite) on this one"
    )


def _get(gm: torch.nn.Module, name: str) -> torch.Tensor:
    owner, leaf = owner_of(gm, name)
    return getattr(owner, leaf)


def _target(current: torch.Tensor, device, dtype) -> tuple[torch.device, torch.dtype]:
    """Where a tensor goes: the given device (default: its own, cpu for meta) and dtype (default:
    its own; integer tensors keep theirs)."""
    if device is None:
        device = "cpu" if current.device.type == "meta" else current.device
    use_dtype = dtype is not None and current.is_floating_point()
    return _resolve_device(device), dtype if use_dtype else current.dtype


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------------------- sizes, progress
def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"cannot tell the free memory of {device}; pass free_bytes=")


def _itemsize(spec: ParamSpec, dtype: torch.dtype | None) -> int:
    kind = getattr(torch, spec.dtype)
    if kind == fp8.E4M3 or spec.name.endswith(SCALE_SUFFIX):
        return kind.itemsize  # an FP8 graph's weights and scales keep their dtype
    return (dtype if dtype is not None and kind.is_floating_point else kind).itemsize


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class Progress:
    """One self-overwriting stderr line on a terminal; into a log file, a line per quarter of
    the tensors and at least every 10 s. In a torchrun rank the lines carry ``[rank N]`` (the
    front end shows those lines). ``what`` names the work ("loading checkpoint", ...)."""

    def __init__(self, tensors: int, nbytes: int, *, enabled: bool,
                 what: str = "loading checkpoint") -> None:
        self.tensors, self.nbytes, self.enabled, self.what = tensors, nbytes, enabled, what
        self.done_tensors = self.done_bytes = 0
        self.tty = sys.stderr.isatty()
        self.start = self.shown = time.perf_counter()
        self.every = max(1, tensors // 4)
        rank = os.environ.get("RANK")
        self.prefix = f"[rank {rank}] " if rank is not None else ""

    def advance(self, nbytes: int) -> None:
        self.done_tensors += 1
        self.done_bytes += nbytes
        if not self.enabled:
            return
        if self.tty:
            if time.perf_counter() - self.shown >= 0.1:
                self._show(end="")
        elif (self.done_tensors % self.every == 0 and self.done_tensors < self.tensors) or (
            time.perf_counter() - self.shown >= 10.0
        ):
            self._show(end="\n")

    def close(self) -> None:
        if self.enabled:
            self._show(end="\n")

    def note(self, text: str) -> None:
        """One line of its own after the progress (once, e.g. what was done to the values)."""
        if self.enabled:
            print(f"{self.prefix}{text}", file=sys.stderr, flush=True)

    def _show(self, end: str) -> None:
        self.shown = time.perf_counter()
        rate = self.done_bytes / 1e6 / max(self.shown - self.start, 1e-9)
        line = (f"{self.prefix}{self.what}: {self.done_tensors}/{self.tensors} tensors, "
                f"{_size(self.done_bytes)}/{_size(self.nbytes)}, {rate:.0f} MB/s")
        # On a terminal: back to the line start, and clear what a longer last line left there.
        print(f"\r{line}\x1b[K" if self.tty else line, end=end, file=sys.stderr, flush=True)


_Progress = Progress  # the earlier name
