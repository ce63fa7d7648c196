"""Parity on real ranks: the TP graph and its attention-DP rewrite against transformers.

Each rank (started by torchrun's machinery, gloo on CPU / NCCL on GPU):
1. builds the TP model from a *source* (transformers' model of the config's family, Qwen3,
   Llama or Qwen2, + PyTorch TP by default),
2. captures its graph and runs it on the whole batch — real all-reduces across the ranks,
3. detects and rewrites it (the stages through :class:`~adp_pass.pipeline.Pipeline`), loads
   the unsharded state dict with ``strict=True``,
4. runs the rewritten graph on its own (uneven) slice of the batch — no collective left.

The parent compares (2) and the concatenation of (4) with transformers' model on the batch.

With a ``checkpoint`` (``adp verify --checkpoint DIR``) the weights are the checkpoint's: each
rank's captured TP graph and its rewritten graph are filled by the loader with that rank's
shard (``runtime/weights.py``, as ``adp run --checkpoint`` loads a serving rank), an FP8
checkpoint's decoder linears becoming FP8 linears first (``adp_pass/fp8_linears.py``, as
``prepare_rank`` builds an FP8 rank), and the reference is transformers' model over the
checkpoint's weights (an FP8 checkpoint's dequantized, as ``runtime/first_step.py`` compares an
FP8 rank). An FP8 graph quantizes its activations (e4m3 per token and 128-group), which no
transformers model does: it is held to the FP8 bounds below, not to one tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import PretrainedConfig

from adp_pass.capture import build_hf, capture, parallelize_hf
from adp_pass.detect import find_collectives
from adp_pass.launch import init_rank, job_device, launch
from adp_pass.mapping import Mapping
from adp_pass.pipeline import Pipeline

# A source builds rank ``rank``'s TP model and the unsharded state dict the rewrite loads.
TPSource = Callable[[PretrainedConfig, int, int, int], tuple[torch.nn.Module, dict]]

# FP8 checkpoints: the bounds docs/fp8.md states, and tests/test_fp8_graph.py and
# tests/test_fp8_native.py assert, reused here.
# * Against transformers on the dequantized weights in fp32 (what quantizing the activations
#   costs): each quantized element is within 2^-4 of itself (3 mantissa bits), ~0.036 in RMS;
#   fp8-tiny's logits measured 0.048 relative in norm there, 0.051-0.053 in `adp verify` (2
#   gloo ranks, batch 4x6). Bound 2^-3, relative in norm; raw e4m3 codes without their
#   scales, or a wrong tile, give O(1). (Max |diff| is printed, not bounded: it follows the
#   logits' scale.)
FP8_VS_DEQUANTIZED = 2**-3
# * The rewritten graph against the TP graph: the same e4m3 codes and scales, fp32 sums in
#   another order (row-parallel partial sums, GEMMs of other row counts), so each sequence
#   agrees within --tolerance (1e-4, the bf16 graphs' bound), except where a ~1e-7 difference
#   pushes an activation across an e4m3 rounding midpoint: it moves by one e4m3 step and that
#   sequence's logits by up to ~2e-2. One token's event: at most FP8_FLIPPED_ROWS sequences may
#   exceed --tolerance, by at most FP8_FLIP_TOLERANCE. A wrong scale tile or shard reaches every
#   sequence (tests/test_fp8_graph.py: doubling one scale moves all of them, by up to 7e-2).
FP8_FLIP_TOLERANCE, FP8_FLIPPED_ROWS = 5e-2, 1
# * Lowered against rewritten (``--lower``: Triton ops and the fused activation quantization on
#   the same codes and scales): relative in norm < 1e-3, every logit within FP8_FLIP_TOLERANCE
#   (tests/test_fp8_native.py::assert_w8a8_close).
FP8_LOWERED_RELATIVE = 1e-3
# * A rank's first-step logits (``runtime/first_step.py``; bench_decode states it,
#   tests/test_fp8_native.py asserts it) against the W8A8 arithmetic done exactly: the
#   dequantized weights in fp32 with each FP8 linear's input rounded to e4m3 as the kernels
#   round it. Max |diff| <= the larger of 2^-3 of the largest |logit| and FP8_FIRST_STEP_FLOOR
#   times the noise floor: the same W8A8 arithmetic in the rank's dtype (PyTorch's ops) against
#   the exact one, where a correct pipeline at that precision lands. In fp32 the floor is 0 and
#   the first term governs (fp8-tiny: ours 3.7e-7). At real widths in bf16 the floor governs
#   at any depth (one H100, Qwen3-8B-FP8: at 2 layers, ``--layers 2``, ours 0.640 against a
#   floor of 0.628 and 2^-3 x max |logit| 0.691; at 36 layers ours 2.352 against 2.355): there
#   the check says that ours lands where a correct bf16 pipeline does (docs/fp8.md).
FP8_FIRST_STEP = 2**-3
# Two correct pipelines in one dtype each land about the floor from the exact arithmetic, by
# different rounding paths: twice the floor leaves room for that spread, not for an error.
FP8_FIRST_STEP_FLOOR = 2.0


def hf_tp_source(
    config: PretrainedConfig, world_size: int, rank: int, seed: int
) -> tuple[torch.nn.Module, dict]:
    """transformers' model of the config's family (adp_pass/families) made TP with its own
    ``base_model_tp_plan``."""
    model = build_hf(config, seed=seed)  # on the CPU: the same weights on every machine
    full_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if job_device() == "cuda":  # the device mesh follows the parameters' device
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    return parallelize_hf(model, world_size), full_state


def default_splits(batch: int, world_size: int) -> list[int]:
    """Uneven rows per rank: rank 0 gets one sequence, the rest share the remainder."""
    if batch < world_size:
        raise ValueError(f"batch {batch} is smaller than the world size {world_size}")
    rest = batch - 1
    share = [rest // (world_size - 1) + (i < rest % (world_size - 1)) for i in range(world_size - 1)]
    return [1, *share] if world_size > 1 else [batch]


@dataclass
class ParityReport:
    mapping: str
    world_size: int
    splits: list[int]
    tp_max_abs_diff: float
    adp_max_abs_diff: float
    site_counts: dict[str, int]
    collectives_left: int
    plan_text: str = field(repr=False, default="")
    seconds: float = 0.0
    lowered_vs_rewritten_max_abs_diff: float | None = None
    lower_counts: dict[str, int] = field(default_factory=dict)
    self_check: str = ""
    # With a checkpoint: its path, and how many decoder linears ran in FP8 (0: bf16/fp32)
    checkpoint: str | None = None
    fp8_linears: int = 0
    # |logits - transformers| relative in norm (||diff|| / ||transformers||)
    tp_relative_diff: float = 0.0
    adp_relative_diff: float = 0.0
    lowered_vs_rewritten_relative_diff: float | None = None
    # max |rewritten - TP graph| of each sequence of the batch
    adp_vs_tp_row_diffs: list[float] = field(default_factory=list)

    @property
    def fp8(self) -> bool:
        return self.fp8_linears > 0

    def within(self, tolerance: float) -> tuple[bool, str]:
        """Whether the figures are within the bounds, and the bounds in words (the verdict
        line). Weights of 16/32 bits: every |logits difference| <= ``tolerance``. An FP8
        checkpoint: the FP8 bounds above, ``tolerance`` the per-sequence bound of the rewritten
        graph against the TP graph."""
        if not self.fp8:
            diffs = [self.tp_max_abs_diff, self.adp_max_abs_diff]
            if self.lowered_vs_rewritten_max_abs_diff is not None:
                diffs.append(self.lowered_vs_rewritten_max_abs_diff)
            return max(diffs) <= tolerance, f"tolerance {tolerance:g}"
        flip = max(tolerance, FP8_FLIP_TOLERANCE)
        rows = self.adp_vs_tp_row_diffs
        ok = (max(self.tp_relative_diff, self.adp_relative_diff) <= FP8_VS_DEQUANTIZED
              and sum(d > tolerance for d in rows) <= FP8_FLIPPED_ROWS
              and max(rows, default=0.0) <= flip)
        text = (f"FP8 tolerances: vs transformers on the dequantized weights, relative in norm "
                f"<= {FP8_VS_DEQUANTIZED:g} (activations quantized to e4m3 per 128-group); "
                f"rewritten vs TP graph, each sequence <= {tolerance:g}, at most "
                f"{FP8_FLIPPED_ROWS} up to {flip:g} (an e4m3 rounding flip)")
        if self.lowered_vs_rewritten_max_abs_diff is not None:
            ok = ok and (self.lowered_vs_rewritten_relative_diff <= FP8_LOWERED_RELATIVE
                         and self.lowered_vs_rewritten_max_abs_diff <= FP8_FLIP_TOLERANCE)
            text += (f"; lowered vs rewritten, relative in norm <= {FP8_LOWERED_RELATIVE:g}, "
                     f"each logit <= {FP8_FLIP_TOLERANCE:g}")
        return ok, text + "; docs/fp8.md"

    def __str__(self) -> str:
        weights = ""
        if self.checkpoint is not None:
            weights = f", weights of {self.checkpoint}" + (
                f" ({self.fp8_linears} FP8 linears, reference: transformers on the dequantized "
                "weights)" if self.fp8 else "")

        def vs(absolute: float, relative: float) -> str:
            return f"{absolute:.3e}" + (f" (relative in norm {relative:.3e})" if self.fp8 else "")

        rows = ""
        if self.fp8:
            rows = ("\n  rewritten vs TP graph (the same FP8 arithmetic)  max |diff| per "
                    f"sequence [{', '.join(f'{d:.1e}' for d in self.adp_vs_tp_row_diffs)}]")
        lowered, lowered_relative = "", self.lowered_vs_rewritten_relative_diff or 0.0
        if self.lowered_vs_rewritten_max_abs_diff is not None:
            lowered = (f"\n  lowered to Triton ops {self.lower_counts}: max |lowered - rewritten| "
                       f"= {vs(self.lowered_vs_rewritten_max_abs_diff, lowered_relative)}")
        return (
            f"parity on {self.world_size} ranks, mapping {self.mapping} (rows per DP group "
            f"{self.splits}){weights}:\n"
            f"  TP graph, all ranks on the whole batch   max |logits - transformers| = "
            f"{vs(self.tp_max_abs_diff, self.tp_relative_diff)}\n"
            f"  rewritten graph, each DP group its rows  max |logits - transformers| = "
            f"{vs(self.adp_max_abs_diff, self.adp_relative_diff)}{rows}\n"
            f"  sites {self.site_counts}, collectives left {self.collectives_left}\n"
            f"  rewrite self-check (rank 0): {self.self_check}"
        ) + lowered


def _rank_main(
    config: PretrainedConfig,
    source: TPSource,
    ids: torch.Tensor,
    splits: list[int],
    seed: int,
    lower_ops: bool,
    self_check: bool = True,
    mapping: Mapping | None = None,
    dump_dir: str | None = None,
    checkpoint: str | None = None,
) -> dict:
    from adp_pass.runtime.rank import join_groups

    rank, world_size, device = init_rank()
    mapping = mapping or Mapping(tp_size=world_size, enable_attention_dp=True)
    pipeline = Pipeline(f"{dump_dir}/rank{rank}" if dump_dir is not None else None)
    tp_model, full_state = source(config, world_size, rank, seed)
    tp_model = tp_model.to(device)
    ids = ids.to(device)
    captured = pipeline.capture(
        lambda: capture(tp_model, [ids], rank=rank, world_size=world_size))
    if checkpoint is not None:  # the source's weights are replaced by the checkpoint's shards
        _load_tp_graph(pipeline, captured.gm, checkpoint, world_size, device)
    with torch.no_grad():
        tp_logits = captured.gm(ids)[0]
    plan = pipeline.detect(captured.gm, mapping)
    plan_text = str(plan)
    if checkpoint is not None:
        # The numeric self-check (replicated mappings only) reads every unsharded weight; a
        # replicated rank holds them all anyway. Other mappings: its shape check, no weights.
        full_state = (checkpoint_tensors(checkpoint) if self_check and plan.replicated_only
                      else None)
    # The unsharded weights drive rewrite's numeric self-check of the first layer; rewrite
    # also cuts each weight to what this rank holds under the mapping.
    gm = pipeline.rewrite(captured.gm, plan, state_dict=full_state, self_check=self_check)
    if checkpoint is not None:  # this rank's part of every tensor, as a serving rank loads it
        from adp_pass.runtime.weights import load_checkpoint

        del full_state
        load_checkpoint(gm, plan, checkpoint, device=device, progress=False)
    elif plan.replicated_only:  # every tensor whole: the unsharded state dict loads as it is
        gm.load_state_dict(full_state, strict=True)
    join_groups(mapping, gm, rank)
    dp_rank = mapping.dp_rank(rank)
    start = sum(splits[:dp_rank])
    mine = ids[start : start + splits[dp_rank]]
    # Ranks whose graphs meet in a collective step together on equal shapes: pad with rows of
    # token 0 to the largest group's rows, and drop them after (the runtime does the same).
    rows = max(splits) if mapping.lockstep_size > 1 else len(mine)
    padded = torch.cat([mine, mine.new_zeros((rows - len(mine), mine.shape[1]))])

    def run(module) -> torch.Tensor | None:
        if not rows:
            return None
        with torch.no_grad():
            return module(padded)[0][: len(mine)].cpu()

    adp_logits = run(gm)
    lowered_logits, lower_counts = None, {}
    if lower_ops:
        # In place: RMSNorm, residual + RMSNorm, SiLU*mul, q/k norm + rotary.
        gm = pipeline.lower(gm)
        lower_counts = dict(pipeline.reports["lower"].counts)
        lowered_logits = run(gm)
    leader = rank == mapping.attn_group(rank)[0]
    return {
        "tp_logits": tp_logits.cpu(),
        "adp_logits": adp_logits if leader else None,
        "lowered_logits": lowered_logits if leader else None,
        "counts": plan.counts(),
        "collectives_left": len(find_collectives(gm.graph)),
        "plan": plan_text,
        "lower_counts": lower_counts,
        "self_check": pipeline.rewrite_report.self_check,
        "fp8_linears": getattr(pipeline.reports.get("fp8_linears"), "fp8_linears", 0),
    }


def _load_tp_graph(pipeline: Pipeline, gm: torch.fx.GraphModule, checkpoint: str,
                   world_size: int, device: torch.device) -> None:
    """Fill a rank's captured TP graph from ``checkpoint``, in place: an FP8 checkpoint's
    decoder linears become FP8 linears first (its fp8 weights and scales, as ``prepare_rank``
    builds an FP8 rank; detect then shards the scales with their weights and refuses a shard of
    partial 128-blocks), then the loader reads this rank's TP shard of every tensor through the
    plan of the TP job as captured (``attn_dp=0``: each rank holds its TP shard)."""
    from adp_pass.detect import detect
    from adp_pass.fp8_linears import checkpoint_fp8_weights
    from adp_pass.runtime.weights import load_checkpoint

    names = checkpoint_fp8_weights(checkpoint)
    if names:
        pipeline.fp8_linears(gm, names)
    load_checkpoint(gm, detect(gm, Mapping(tp_size=world_size)), checkpoint, device=device,
                    progress=False)


def checkpoint_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory as stored (fp8 weights stay fp8, scales as
    stored): the unsharded weights the rewrite's numeric self-check reads."""
    from safetensors.torch import load_file

    from adp_pass.checks import safetensors_files

    tensors = {}
    for path in safetensors_files(Path(checkpoint)):
        tensors.update(load_file(str(path)))
    return tensors


def checkpoint_reference(config: PretrainedConfig, checkpoint: str | Path) -> torch.nn.Module:
    """transformers' model of ``config`` in fp32 over the checkpoint's weights: an FP8
    checkpoint's weights dequantized (e4m3 x its tile's scale, exact in fp32) and the scales
    dropped, as ``runtime/first_step.py`` compares an FP8 rank: exact arithmetic on the weights
    the ranks hold."""
    from adp_pass import fp8

    weights = {k: v.float() for k, v in fp8.dequantize_state(checkpoint_tensors(checkpoint)).items()}
    model = build_hf(config)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # saved once
    model.load_state_dict(weights, strict=True)
    return model


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def verify(
    config: PretrainedConfig,
    world_size: int,
    *,
    batch: int = 4,
    seq: int = 8,
    splits: list[int] | None = None,
    seed: int = 0,
    source: TPSource = hf_tp_source,
    lower_ops: bool = False,
    timeout_s: float = 300.0,
    log_dir: str | None = None,
    self_check: bool = True,
    mapping: Mapping | str | None = None,
    dump_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> ParityReport:
    """Run the parity check on ``world_size`` local ranks and return the measured differences.

    ``mapping`` (default ``tp=world_size,attn_dp=1``) says what the TP graph is rewritten to;
    ``splits`` gives each DP group (``mapping.dp_size`` of them) its rows of the batch.
    With ``log_dir``, the ranks' output goes to files there instead of the terminal; with
    ``dump_dir``, each rank writes its stages' graphs to ``dump_dir/rank<r>/``.

    ``checkpoint``: a Hugging Face checkpoint directory of ``config`` (bf16/fp32, or FP8
    block-scaled): the ranks load its weights, each its shard, and transformers' reference
    holds them (dequantized for FP8); ``seed`` then draws the input ids only. The source's
    model must name its tensors as the checkpoint does (``hf_tp_source``: transformers')."""
    start = time.perf_counter()
    mapping = Mapping.load(mapping or f"tp={world_size},attn_dp=1")
    if mapping.world_size != world_size:
        raise ValueError(f"mapping {mapping} is for {mapping.world_size} ranks, not {world_size}")
    groups = mapping.dp_size
    splits = list(splits) if splits is not None else default_splits(batch, groups)
    if len(splits) != groups or sum(splits) != batch or min(splits) < 0:
        raise ValueError(f"splits {splits} must give each of {groups} DP groups rows of {batch}")
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    results = launch(
        _rank_main, world_size, config, source, ids, splits, seed, lower_ops, self_check,
        mapping, str(dump_dir) if dump_dir is not None else None,
        str(checkpoint) if checkpoint is not None else None, timeout_s=timeout_s,
        log_dir=log_dir,
    )
    if checkpoint is not None:
        reference = checkpoint_reference(config, checkpoint)
    else:
        reference = build_hf(config, seed=seed)
    with torch.no_grad():
        want = reference(input_ids=ids, use_cache=False).logits
    tp_diff = max((r["tp_logits"] - want).abs().max().item() for r in results)
    tp_relative = max(_relative(r["tp_logits"], want) for r in results)
    adp = torch.cat([r["adp_logits"] for r in results if r["adp_logits"] is not None])
    lowered_diff = lowered_relative = None
    if lower_ops:
        lowered = torch.cat([r["lowered_logits"] for r in results if r["lowered_logits"] is not None])
        lowered_diff = (lowered - adp).abs().max().item()
        lowered_relative = _relative(lowered, adp)
    # Each sequence's rewritten logits against the TP graph's (rank 0's; every rank's TP graph
    # returns the whole batch).
    rows = [(a - t).abs().max().item() for a, t in zip(adp, results[0]["tp_logits"])]
    return ParityReport(
        mapping=str(mapping),
        world_size=world_size,
        splits=splits,
        tp_max_abs_diff=tp_diff,
        adp_max_abs_diff=(adp - want).abs().max().item(),
        site_counts=results[0]["counts"],
        collectives_left=max(r["collectives_left"] for r in results),
        plan_text=results[0]["plan"],
        seconds=time.perf_counter() - start,
        lowered_vs_rewritten_max_abs_diff=lowered_diff,
        lower_counts=results[0]["lower_counts"],
        self_check=results[0]["self_check"],
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        fp8_linears=results[0]["fp8_linears"],
        tp_relative_diff=tp_relative,
        adp_relative_diff=_relative(adp, want),
        lowered_vs_rewritten_relative_diff=lowered_relative,
        adp_vs_tp_row_diffs=rows,
    )
