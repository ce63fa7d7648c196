"""FP8 linears in a captured graph: the decoder projections of an FP8 checkpoint become
``adp::fp8_block_linear`` (docs/fp8.md, "Serving an FP8 checkpoint").

A rank captures transformers' bf16/fp32 model of the checkpoint's config, so its projections are
``mm(x, t(W))`` on a run-dtype ``W``. When the checkpoint stores ``W`` as float8_e4m3fn with its
``weight_scale_inv`` (the Qwen3-FP8 block-scaled format), :func:`use_fp8_linears` rewrites each
such projection to ``adp.fp8_block_linear(x, W_fp8, W_scale_inv)``: the parameter ``W`` becomes a
float8_e4m3fn parameter of the same (rank-local) shape and ``<W>_scale_inv`` (float32, one per
128 x 128 tile of the local shape) is registered beside it on the same module. The names are the
checkpoint's (``model.layers.0.self_attn.q_proj.weight`` and ``...weight_scale_inv``), so the
loader reads both by name, natively, and detect pairs them off the op's arguments.

Run right after capture, before detect: the sharding analysis then shards the scales with their
weights (``sharding_rules.rule_fp8_linear``), and a rank shard that is not whole 128-blocks is
refused by detect (``fp8.Fp8BlockError``) before any weight is read.

Which weights: exactly the checkpoint's fp8 tensors (:func:`checkpoint_fp8_weights`, validated
from config.json and the safetensors headers), so embeddings, norms, the LM head and anything in
``modules_to_not_convert`` stay as captured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from adp_pass import fp8
from adp_pass.attributes import owner_of
from adp_pass.checks import SCALE_SUFFIX, check_quantization, header_entries
from adp_pass.errors import AdpError
from adp_pass.fx_vocab import is_op

aten = torch.ops.aten
FP8_LINEAR = torch.ops.adp.fp8_block_linear.default
SCALE_DTYPE = torch.float32  # the kernels read any of fp32/bf16/fp16; fp32 holds every stored one


class Fp8LinearError(AdpError, ValueError):
    """A checkpoint fp8 weight the graph does not read as a plain projection: the message names
    the weight and the fix."""


@dataclass(frozen=True)
class Fp8Linears:
    """What :func:`use_fp8_linears` did: the weights now fp8 (graph attribute names, in graph
    order) and their scale attributes."""

    weights: tuple[str, ...]
    scales: tuple[str, ...]

    @property
    def replaced(self) -> int:
        return len(self.weights)


def checkpoint_fp8_weights(checkpoint_dir: str | Path) -> list[str]:
    """The names of the fp8 weights of a checkpoint directory (none for an unquantized one),
    validated as the loader validates them (quantization_config, every fp8 weight's scale of the
    128 x 128 tile grid): headers only, no tensor read."""
    root = Path(checkpoint_dir)
    config = None
    if (root / "config.json").is_file():
        config = json.loads((root / "config.json").read_text())
    entries: dict = {}
    for path in sorted(root.glob("*.safetensors")):
        entries.update(header_entries(path, None))
    return check_quantization(config if isinstance(config, dict) else None, entries, root, None)


def use_fp8_linears(gm: fx.GraphModule, fp8_weights: Iterable[str]) -> Fp8Linears:
    """Rewrite every projection ``mm(x, t(W))`` / ``linear(x, W)`` whose ``W`` is one of
    ``fp8_weights`` (graph attribute names, the checkpoint's) to ``adp.fp8_block_linear``, in
    place. Every name must be such a projection's weight, read by nothing else; a biased one
    (``addmm`` / ``linear`` with bias) is refused, as the op has no bias. Idempotent: a weight
    that is already fp8 with its scale is left as it is."""
    wanted = set(fp8_weights)
    graph = gm.graph
    found: dict[str, tuple[fx.Node, fx.Node, fx.Node]] = {}  # W -> (projection, x, get_attr W)
    for node in graph.nodes:
        hit = _projection(node)
        if hit is None:
            continue
        x, weight, biased = hit
        if weight.target not in wanted:
            continue
        if biased:
            raise Fp8LinearError(
                f"{weight.target} is fp8 in the checkpoint but its projection {node.name} adds a "
                "bias; adp.fp8_block_linear has none: serve this checkpoint dequantized "
                "(prepare_rank(fp8_linears=False))")
        if weight.target in found:
            raise Fp8LinearError(
                f"{weight.target} is read by two projections ({found[weight.target][0].name}, "
                f"{node.name}); an fp8 weight must belong to one linear: serve this checkpoint "
                "dequantized (prepare_rank(fp8_linears=False))")
        found[weight.target] = (node, x, weight)
    _refuse_other_readers(gm, wanted, found)
    missing = sorted(wanted - set(found) - _already_fp8(gm, wanted))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise Fp8LinearError(
            f"{len(missing)} fp8 weights of the checkpoint are not the weight of a projection "
            f"mm(x, t(W)) in the graph: {', '.join(missing[:3])}{more}; the graph was captured "
            "from another model, or reads them another way: capture the checkpoint's config, or "
            "serve it dequantized (prepare_rank(fp8_linears=False))")
    weights, scales = [], []
    by_projection = {hit[0]: target for target, hit in found.items()}
    for node in list(graph.nodes):  # graph order, for stable reports
        target = by_projection.get(node)
        if target is None:
            continue
        projection, x, weight = found[target]
        scale = _fp8_parameters(gm, target, weight)
        with graph.inserting_after(weight):
            scale_node = graph.get_attr(scale)
        _set_value(scale_node, _fake_like(weight, gm.get_parameter(scale)))
        with graph.inserting_before(projection):
            linear = graph.call_function(FP8_LINEAR, (x, weight, scale_node))
        linear.meta.update({k: v for k, v in projection.meta.items()
                            if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        _set_value(linear, _run_fake(FP8_LINEAR, x.meta.get("val"), weight.meta.get("val"),
                                     scale_node.meta.get("val")))
        projection.replace_all_uses_with(linear)
        transposed = projection.args[1] if is_op(projection, {aten.mm.default}) else None  # t(W)
        graph.erase_node(projection)
        if transposed is not None and not transposed.users:
            graph.erase_node(transposed)
        weights.append(target)
        scales.append(scale)
    graph.lint()
    gm.recompile()
    return Fp8Linears(tuple(weights), tuple(scales))


def _projection(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """``(x, get_attr W, biased)`` of ``mm(x, t(W))``, ``addmm(b, x, t(W))`` or
    ``linear(x, W[, b])``; else None. Biased forms are returned so that they are refused by
    name, never silently skipped."""
    if is_op(node, {aten.mm.default, aten.addmm.default}):
        biased = is_op(node, {aten.addmm.default})
        w = node.args[2 if biased else 1]
        if isinstance(w, fx.Node) and is_op(w, {aten.t.default}):
            w = w.args[0]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                return node.args[1 if biased else 0], w, biased
    elif is_op(node, {aten.linear.default}):
        w = node.args[1]
        if isinstance(w, fx.Node) and w.op == "get_attr":
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            return node.args[0], w, bias is not None
    return None


def _refuse_other_readers(gm: fx.GraphModule, wanted: set[str],
                          found: dict[str, tuple[fx.Node, fx.Node, fx.Node]]) -> None:
    # An fp8 weight read by anything but its projection (a tied embedding, a norm of it) would
    # read e4m3 codes without their scales: the corruption this format must never allow.
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in found:
            continue
        projection = found[node.target][0]
        for user in node.users:
            ok = user is projection or (is_op(user, {aten.t.default})
                                        and set(user.users) == {projection})
            if not ok:
                raise Fp8LinearError(
                    f"{node.target} is fp8 in the checkpoint but {user.name} ({user.target}) "
                    f"reads it besides its projection {projection.name}; fp8 codes are never "
                    "read without their scales: serve this checkpoint dequantized "
                    "(prepare_rank(fp8_linears=False))")


def _already_fp8(gm: fx.GraphModule, wanted: set[str]) -> set[str]:
    done = set()
    for name in wanted:
        try:
            weight = gm.get_parameter(name)
        except AttributeError:
            continue
        if weight.dtype == fp8.E4M3 and _has(gm, name + SCALE_SUFFIX):
            done.add(name)
    return done


def _has(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
    except AttributeError:
        return False
    return True


def _fp8_parameters(gm: fx.GraphModule, target: str, weight: fx.Node) -> str:
    """Replace parameter ``target`` by a float8_e4m3fn one of its shape and register its scale
    grid beside it; the attribute name of the scale. Values are placeholders (the capture's are
    too: a fake group moves no data); the loader fills both."""
    owner, leaf = owner_of(gm, target)
    old = getattr(owner, leaf)
    if old.dim() != 2:
        raise Fp8LinearError(f"{target} is {list(old.shape)} in the graph; an fp8 weight is a "
                             "2-D linear weight [out, in]: the checkpoint does not match the "
                             "graph's model; capture the checkpoint's config")
    scale_leaf = leaf + SCALE_SUFFIX
    if hasattr(owner, scale_leaf):
        raise Fp8LinearError(f"{target}{SCALE_SUFFIX} already exists in the graph beside a "
                             f"{old.dtype} weight; run use_fp8_linears on the captured graph")
    shape = tuple(old.shape)
    new = torch.nn.Parameter(torch.empty(shape, dtype=fp8.E4M3, device=old.device),
                             requires_grad=False)
    scale = torch.nn.Parameter(torch.ones(fp8.scale_shape(shape), dtype=SCALE_DTYPE,
                                          device=old.device), requires_grad=False)
    setattr(owner, leaf, new)
    owner.register_parameter(scale_leaf, scale)
    _set_value(weight, _fake_like(weight, new))
    return target + SCALE_SUFFIX


def _fake_like(node: fx.Node, tensor: torch.Tensor):
    """A fake tensor of ``tensor``'s shape, dtype and device in the fake mode of ``node``'s
    value (the graph's)."""
    mode = getattr(node.meta.get("val"), "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device=node.meta["val"].device)


def _run_fake(op, *values):
    if any(v is None for v in values):
        return None
    mode = getattr(values[0], "fake_mode", None) or getattr(values[1], "fake_mode", None)
    with mode:
        return op(*values)


def _set_value(node: fx.Node, value) -> None:
    if value is None:
        node.meta.pop("val", None)
        node.meta.pop("tensor_meta", None)
        return
    node.meta["val"] = value
    node.meta["tensor_meta"] = _extract_tensor_metadata(value)


__all__ = ["Fp8LinearError", "Fp8Linears", "checkpoint_fp8_weights", "use_fp8_linears"]
