"""Parity on real ranks: the TP graph and its attention-DP rewrite against transformers.

Each rank (started by torchrun's machinery, gloo on CPU / NCCL on GPU):
1. builds the TP model from a *source* (transformers' model of the config's family, Qwen3,
   Llama or Qwen2, + PyTorch TP by default),
2. captures its graph and runs it on the whole batch — real all-reduces across the ranks,
3. detects and rewrites it (the stages through :class:`~adp_pass.pipeline.Pipeline`), loads
   the unsharded state dict with ``strict=True``,
4. runs the rewritten graph on its own (uneven) slice of the batch — no collective left.

The parent compares (2) and the concatenation of (4) with transformers' model on the batch.
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

    def __str__(self) -> str:
        return (
            f"parity on {self.world_size} ranks, mapping {self.mapping} (rows per DP group "
            f"{self.splits}):\n"
            f"  TP graph, all ranks on the whole batch   max |logits - transformers| = "
            f"{self.tp_max_abs_diff:.3e}\n"
            f"  rewritten graph, each DP group its rows  max |logits - transformers| = "
            f"{self.adp_max_abs_diff:.3e}\n"
            f"  sites {self.site_counts}, collectives left {self.collectives_left}\n"
            f"  rewrite self-check (rank 0): {self.self_check}"
        ) + (
            f"\n  lowered to Triton ops {self.lower_counts}: max |lowered - rewritten| = "
            f"{self.lowered_vs_rewritten_max_abs_diff:.3e}"
            if self.lowered_vs_rewritten_max_abs_diff is not None
            else ""
        )


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
    with torch.no_grad():
        tp_logits = captured.gm(ids)[0]
    plan = pipeline.detect(captured.gm, mapping)
    plan_text = str(plan)
    # The unsharded weights drive rewrite's numeric self-check of the first layer; rewrite
    # also cuts each weight to what this rank holds under the mapping.
    gm = pipeline.rewrite(captured.gm, plan, state_dict=full_state, self_check=self_check)
    if plan.replicated_only:  # every tensor whole: the unsharded state dict loads as it is
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
    }


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
) -> ParityReport:
    """Run the parity check on ``world_size`` local ranks and return the measured differences.

    ``mapping`` (default ``tp=world_size,attn_dp=1``) says what the TP graph is rewritten to;
    ``splits`` gives each DP group (``mapping.dp_size`` of them) its rows of the batch.
    With ``log_dir``, the ranks' output goes to files there instead of the terminal; with
    ``dump_dir``, each rank writes its stages' graphs to ``dump_dir/rank<r>/``."""
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
        mapping, str(dump_dir) if dump_dir is not None else None, timeout_s=timeout_s,
        log_dir=log_dir,
    )
    reference = build_hf(config, seed=seed)
    with torch.no_grad():
        want = reference(input_ids=ids, use_cache=False).logits
    tp_diff = max((r["tp_logits"] - want).abs().max().item() for r in results)
    adp = torch.cat([r["adp_logits"] for r in results if r["adp_logits"] is not None])
    lowered_diff = None
    if lower_ops:
        lowered = torch.cat([r["lowered_logits"] for r in results if r["lowered_logits"] is not None])
        lowered_diff = (lowered - adp).abs().max().item()
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
    )
