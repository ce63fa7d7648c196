"""Prefetch each projection's weight into L2 while the kernels before it leave HBM idle.

Matches: the projections of a lowered graph, in graph order: ``aten.mm(x, aten.t(W))``,
``aten.addmm(b, x, aten.t(W))``, ``aten.linear(x, W)`` and ``adp.decode_mm(x, W)``, with ``W`` a
module attribute; and the attention ops (``adp.cached_attention``) between them.
Inserts: ``adp.prefetch_l2(W, site)`` for a projection ``P``, in stream order where HBM has room:

* ``site="attention"``: ``P`` comes right after an attention (o_proj). The prefetch goes right
  after the projection before the attention (q|k|v), so it overlaps the rotary, the cache write
  and the attention, which streams the KV cache at ~86% of the copy bandwidth and loads it
  evict-first (``paged_attention.KV_EVICTION``), leaving the prefetched lines in L2.
* ``site="gap"``: between the previous projection and ``P`` there are only our small kernels
  (norms, SwiGLU): the prefetch goes right after the previous projection and takes the first
  ``prefetch.BYTES["gap"]`` bytes of ``W`` while they run and while ``P`` ramps up.

The prefetches run on a side stream (``prefetch.SIDE_STREAM``); ``adp.prefetch_join`` before the
graph's outputs joins it back, as a CUDA graph capture requires.

Projections with no kernel of ours between them and the previous one (e.g. unfused q, k, v side
by side) get none: there is no idle time to fill.

Why: at decode batch sizes the projections are weight reads of 8-50 µs, and the time between
them is HBM time lost (docs/benchmarks.md, decode step by kernel). Like ``fuse_projections`` and
``decode_mm`` this runs on the rank, after the build cache; the op is a hint that changes no
value, does nothing on CPU, and reads its mode and byte caps at launch
(``runtime/kernels/prefetch.py``).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from adp_pass.fx_vocab import is_op
from adp_pass.graph_record import graph_record
# Registered on import: adp.prefetch_l2, adp.cached_attention.
from adp_pass.runtime.kernels import cached_attention as _cached_attention  # noqa: F401
from adp_pass.runtime.kernels import prefetch as _prefetch  # noqa: F401

from .graph_utils import projection_weight

PREFETCH = torch.ops.adp.prefetch_l2.default
JOIN = torch.ops.adp.prefetch_join.default
_ATTENTION_OPS = {torch.ops.adp.cached_attention.default}


def insert_weight_prefetch(gm: fx.GraphModule) -> dict[str, int]:
    """Insert the prefetches in place; how many per site kind. A graph that has them already is
    left as it is."""
    graph = gm.graph
    existing = Counter(node.args[1] for node in graph.nodes if is_op(node, {PREFETCH}))
    if existing:
        counts = {"attention": existing.get("attention", 0), "gap": existing.get("gap", 0)}
        graph_record(gm).prefetch = counts
        return counts
    heavy: list[tuple[fx.Node, fx.Node | None]] = []  # (node, weight get_attr or None: attention)
    ours_since: list[bool] = []  # an adp kernel ran between this heavy node and the one before
    seen_kernel = False
    for node in graph.nodes:
        weight = projection_weight(node)
        if weight is not None or is_op(node, _ATTENTION_OPS):
            heavy.append((node, weight))
            ours_since.append(seen_kernel)
            seen_kernel = False
        elif _is_adp_kernel(node):
            seen_kernel = True
    counts = {"attention": 0, "gap": 0}
    last_weight = None
    for index, (node, weight) in enumerate(heavy):
        if weight is None:
            continue
        before = index - 1
        if before >= 0 and heavy[before][1] is None:
            site = "attention"
            before -= 1
        elif ours_since[index]:
            site = "gap"
        else:
            continue
        if before < 0:
            continue  # the step's first projection: nothing runs before it to overlap
        with graph.inserting_after(heavy[before][0]):
            attr = graph.get_attr(weight.target)
        with graph.inserting_after(attr):
            graph.call_function(PREFETCH, (attr, site))
        counts[site] += 1
        last_weight = weight.target
    if last_weight is not None:
        # Prefetches run on a side stream; it rejoins the step's stream before the outputs.
        output = next(node for node in reversed(graph.nodes) if node.op == "output")
        with graph.inserting_before(output):
            graph.call_function(JOIN, (graph.get_attr(last_weight),))
    if any(counts.values()):
        graph.lint()
        gm.recompile()
    graph_record(gm).prefetch = counts
    return counts


def _is_adp_kernel(node: fx.Node) -> bool:
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target.namespace == "adp" and target is not PREFETCH)
