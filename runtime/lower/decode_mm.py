"""Projections whose decode shape has a tuned weight-stream kernel run ``adp.decode_mm``.

Matches: ``aten.mm(x, aten.t(W))`` with ``W`` a 2-D bf16/fp16 module attribute whose
``(out, in)`` shape is in ``runtime/kernels/decode_mm.TUNED`` (q|k|v, o_proj, down_proj and the
LM head of the tuned models, after ``fuse_projections``).
Replaces with: ``adp.decode_mm(x, W)``, which runs the weight-stream kernel for up to
``MAX_ROWS`` rows on CUDA and ``torch.mm`` otherwise (prefill, CPU), so the graph serves every
batch size on any device.

Why: decode GEMMs are weight reads, and cuBLAS reads some of them well below the copy
bandwidth (docs/lowering.md, "decode_mm"). Like ``fuse_projections`` this runs on a rank whose
weights are filled, after the build cache, so cache entries keep plain ``mm`` nodes and a
change of tuning table needs no rebuild.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from adp_pass.attributes import owner_of
from adp_pass.fx_vocab import is_op
from adp_pass.graph_record import graph_record
from adp_pass.runtime.kernels import decode_mm as kernel

from .graph_utils import eliminate_dead_code, projection_weight

aten = torch.ops.aten


def use_decode_mm(gm: fx.GraphModule) -> int:
    """Replace every matching ``mm(x, t(W))`` in place; the number replaced."""
    replaced = 0
    graph = gm.graph
    for node in list(graph.nodes):
        weight = _tuned_weight(gm, node)
        if weight is None:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.adp.decode_mm.default, (node.args[0], weight))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced += 1
    if replaced:
        eliminate_dead_code(graph)  # the t(W) nodes
        graph.lint()
        gm.recompile()
    graph_record(gm).decode_mm = replaced
    return replaced


def _tuned_weight(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` of ``W`` when ``node`` is ``mm(x, t(W))`` with a tuned 2-D bf16/fp16
    ``W``."""
    if not is_op(node, {aten.mm.default}):
        return None
    weight = projection_weight(node)
    if weight is None:
        return None
    owner, leaf = owner_of(gm, weight.target)
    tensor = getattr(owner, leaf, None)
    # The device is the op's business (CPU tensors run torch.mm): a graph moved between
    # devices stays right. fp32 stays on torch.mm: the kernel would multiply in tf32.
    if not (isinstance(tensor, torch.Tensor) and tensor.dim() == 2
            and tensor.dtype in (torch.bfloat16, torch.float16) and tensor.stride(1) == 1):
        return None
    return weight if tuple(tensor.shape) in kernel.TUNED else None
