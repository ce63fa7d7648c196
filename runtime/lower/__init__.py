"""The lowering pass: transformers' decomposed Qwen3 pieces -> the ``torch.ops.adp`` kernels.

``lower(gm)`` runs the passes of ``PASSES`` in order on a rewritten (or captured) ATen graph, in
place, and returns it. Each pass is one module here with a "Matches: ... Replaces with: ..."
docstring; docs/lowering.md describes them, their counts and numerics.

    from adp_pass.runtime.lower import lower
    gm = lower(gm, max_position=4096)
    lowering = graph_record(gm).lowering
    lowering.counts   # {"rms_norm": 4L+1, "add_rms_norm": 2L, "silu_mul": L, "qk_norm_rope": L}
    lowering.ops      # adp op nodes left in the graph, by op

Counts are matches per pass. ``rms_norm`` counts every RMSNorm it replaced, including those the
later ``add_rms_norm`` / ``qk_norm_rope`` passes absorb (they work on ``adp.rms_norm`` nodes);
``ops`` is the census after all passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch.fx as fx

from adp_pass.graph_record import CosSinTable, LoweringRecord, graph_record

from . import add_rms_norm, fp8_quant, qk_norm_rope, rms_norm, silu_mul
from .graph_utils import adp, eliminate_dead_code, fill_missing_values, op_census, traces_reused


@dataclass(frozen=True)
class LowerPass:
    name: str
    run: Callable[[fx.GraphModule, "LowerContext"], int]
    requires: tuple[str, ...] = ()
    doc: str = ""


@dataclass
class LowerContext:
    """What passes share: options, and notes on sites they saw but left alone."""

    max_position: int = 4096
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def note(self, pass_name: str, message: str) -> None:
        self.notes.append(f"{pass_name}: {message}")


def _entry(module) -> LowerPass:
    return LowerPass(module.NAME, module.run, tuple(module.REQUIRES), module.__doc__ or "")


# The order is part of the contract: add_rms_norm and qk_norm_rope rewrite adp.rms_norm nodes,
# fp8_quant the norm and SwiGLU kernels that feed FP8 linears.
PASSES: tuple[LowerPass, ...] = tuple(
    _entry(module) for module in (rms_norm, add_rms_norm, silu_mul, qk_norm_rope, fp8_quant)
)
PASS_NAMES: tuple[str, ...] = tuple(p.name for p in PASSES)
# Passes that only apply to graphs holding FP8 linears: by default they run on those only, so a
# bf16 graph's counts name the passes that can match it.
FP8_PASSES: tuple[str, ...] = (fp8_quant.NAME,)


def lower(
    gm: fx.GraphModule,
    *,
    passes: Sequence[str] | None = None,
    max_position: int = 4096,
) -> fx.GraphModule:
    """Run the lowering passes on ``gm`` in place and return it.

    ``passes``: names from ``PASS_NAMES`` to run, in the given order (default: all, in
    ``PASSES`` order; ``FP8_PASSES`` only on a graph with ``adp.fp8_block_linear`` nodes); a pass
    whose prerequisite did not run before it is an error.
    ``max_position``: rows of the cos/sin cache (positions must stay below it).
    Results: ``graph_record(gm).lowering``: matches per pass, adp op nodes in the lowered graph,
    per-pass seconds, notes on sites left alone, and the cos/sin tables' provenance.
    """
    by_name = {p.name: p for p in PASSES}
    if isinstance(passes, str):
        passes = [passes]
    if passes is None:
        fp8 = any(n.op == "call_function" and n.target == adp.fp8_block_linear.default
                  for n in gm.graph.nodes)
        passes = [n for n in PASS_NAMES if fp8 or n not in FP8_PASSES]
    names = list(passes)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown lowering pass(es) {unknown}; known: {list(PASS_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a lowering pass is listed twice: {names}")
    for index, name in enumerate(names):
        missing = [r for r in by_name[name].requires if r not in names[:index]]
        if missing:
            raise ValueError(f"lowering pass {name!r} needs {missing} to run before it")
    if max_position < 1:
        raise ValueError(f"max_position must be positive, got {max_position}")

    ctx = LowerContext(max_position=max_position)
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    with traces_reused():  # every decoder layer's match re-traces the same pattern
        for name in names:
            start = time.perf_counter()
            counts[name] = int(by_name[name].run(gm, ctx))
            fill_missing_values(gm.graph)
            seconds[name] = time.perf_counter() - start
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    tables = {name: CosSinTable(**table)
              for name, table in ctx.info.get("cos_sin_cache", {}).items()}
    graph_record(gm).lowering = LoweringRecord(counts, op_census(gm.graph), seconds, ctx.notes,
                                               tables)
    return gm


__all__ = ["FP8_PASSES", "LowerContext", "LowerPass", "PASSES", "PASS_NAMES", "lower"]
