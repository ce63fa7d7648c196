"""Layer stamping: the graph of an L-layer model from a trace of its first two layers.

Tracing is the slow part of a build (dynamo + AOTAutograd over DTensor: about 1.6 s per decoder
layer on a CPU, 100 s for Qwen3-8B's 36 layers on an H200 host). The decoder layers of a dense
model are the same program over different weights, so the capture traces two of them and this
module copies the second one L-2 times in FX, each copy reading layer k's parameters.

Two traced layers, not one: layer 1's graph, compared node by node with layer 0's, proves the
layers are the same program and says which of layer 1's inputs are layer 0's outputs (the
residual stream) and which are shared (rotary cos/sin, the mask, symbolic sizes). Anything that
does not line up raises :class:`NotStampable`, and the caller traces every layer instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from adp_pass.attributes import owner_of, set_attr
from adp_pass.errors import AdpError

_LAYER_IN_PATH = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class NotStampable(AdpError, RuntimeError):
    """The traced layers are not copies of one program (the caller traces every layer)."""


@dataclass(frozen=True)
class LayerSpans:
    """Where the two traced layers sit in the graph's node list."""

    nodes: list[fx.Node]
    first: tuple[int, int]  # [start, end) of layer 0's compute nodes
    second: tuple[int, int]  # [start, end) of layer 1's

    def layer(self, index: int) -> list[fx.Node]:
        """The layer's tensor nodes. Size arithmetic (``s0 * s1`` on SymInts) is left out:
        dynamo computes it once, where the first layer needs it, and later layers share it."""
        start, end = self.first if index == 0 else self.second
        return [n for n in self.nodes[start:end] if not is_size_node(n)]


def is_size_node(node: fx.Node) -> bool:
    """A node computing a (symbolic) integer, not a tensor."""
    return isinstance(node.meta.get("val"), (int, torch.SymInt, torch.SymBool, torch.SymFloat))


def layer_of_attr(target: str, prefix: str) -> int | None:
    """The layer index of a parameter name under ``prefix`` ("model.layers.3.mlp..." -> 3)."""
    if not target.startswith(prefix):
        return None
    head = target[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _within_layer(target: str, prefix: str) -> str:
    """A layer parameter's name inside its layer ("model.layers.3.mlp.up.weight" -> "mlp.up.weight")."""
    return target[len(prefix):].split(".", 1)[1]


def _layer_of_node(node: fx.Node) -> int | None:
    """The decoder layer a compute node was traced in, from dynamo's module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    found = None
    for path, _type in stack.values():
        match = _LAYER_IN_PATH.search(str(path).replace("[", ".").replace("]", ""))
        if match:
            found = int(match.group(1))
    return found


def find_layer_spans(gm: fx.GraphModule) -> LayerSpans:
    """The contiguous node ranges of layers 0 and 1 (compute nodes only; parameter reads are
    matched by name). Raises NotStampable when a layer's nodes are not contiguous."""
    nodes = list(gm.graph.nodes)
    where: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        if node.op == "call_function":
            layer = _layer_of_node(node)
            if layer is not None:
                where.setdefault(layer, []).append(index)
    if sorted(where) != [0, 1]:
        raise NotStampable(f"expected compute nodes of layers 0 and 1, found layers {sorted(where)}")
    spans = []
    for layer in (0, 1):
        start, end = where[layer][0], where[layer][-1] + 1
        strays = [n.name for n in nodes[start:end]
                  if n.op != "call_function" or _layer_of_node(n) not in (layer, None)]
        if strays:
            raise NotStampable(f"layer {layer}'s nodes are interleaved with {strays[:3]}")
        spans.append((start, end))
    if spans[0][1] != spans[1][0]:
        between = [n.name for n in nodes[spans[0][1]:spans[1][0]]]
        raise NotStampable(f"nodes between layer 0 and layer 1: {between[:3]}")
    return LayerSpans(nodes, spans[0], spans[1])


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False  # tensor constants inside a layer: not worth proving equal
    return type(a) is type(b) and a == b


def _match_layers(spans: LayerSpans, prefix: str) -> tuple[dict[fx.Node, fx.Node], set[fx.Node]]:
    """Layer 1's partner of each of layer 0's nodes, and the layer-0 nodes that layer 1 reads
    (the residual stream: where layer 0 read a prologue node, layer 1 reads layer 0's output).
    Raises NotStampable on any other difference."""
    first, second = spans.layer(0), spans.layer(1)
    if len(first) != len(second):
        raise NotStampable(f"layer 0 has {len(first)} nodes, layer 1 {len(second)}")
    in_first = set(first)
    partner = dict(zip(first, second))
    carried: dict[fx.Node, fx.Node] = {}  # layer-0 node read by layer 1 -> what layer 0 read

    def compare(a: Any, b: Any, where: str) -> None:
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            if a.op == "get_attr" and b.op == "get_attr":
                la, lb = layer_of_attr(a.target, prefix), layer_of_attr(b.target, prefix)
                if (la, lb) == (0, 1):
                    if _within_layer(a.target, prefix) != _within_layer(b.target, prefix):
                        raise NotStampable(f"{where}: reads {a.target} vs {b.target}")
                    return
            if a in in_first:
                if partner[a] is not b:
                    raise NotStampable(f"{where}: {a.name} and {b.name} are not partners")
            elif b in in_first:
                if carried.setdefault(b, a) is not a:
                    raise NotStampable(f"{where}: {b.name} stands for two different inputs")
            elif a is not b:
                raise NotStampable(f"{where}: shared input {a.name} vs {b.name}")
            return
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            if type(a) is not type(b) or len(a) != len(b):
                raise NotStampable(f"{where}: argument lists differ")
            for x, y in zip(a, b):
                compare(x, y, where)
            return
        if isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                raise NotStampable(f"{where}: keyword arguments differ")
            for key in a:
                compare(a[key], b[key], where)
            return
        if not _same_value(a, b):
            raise NotStampable(f"{where}: constant {a!r} vs {b!r}")

    for a, b in zip(first, second):
        where = f"{a.name} / {b.name}"
        if a.op != b.op or a.target != b.target:
            raise NotStampable(f"{where}: {a.target} vs {b.target}")
        compare(a.args, b.args, where)
        compare(a.kwargs, b.kwargs, where)
        va, vb = a.meta.get("val"), b.meta.get("val")
        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            if str(va.shape) != str(vb.shape) or va.dtype != vb.dtype:
                raise NotStampable(f"{where}: {tuple(va.shape)} vs {tuple(vb.shape)}")
    if not carried:
        raise NotStampable("layer 1 reads nothing of layer 0: no residual stream to carry")
    return partner, set(carried)


def stamp_layers(
    gm: fx.GraphModule,
    num_layers: int,
    layer_params: Callable[[int], dict[str, tuple[torch.Tensor, bool]]],
    *,
    prefix: str = "model.layers",
) -> fx.GraphModule:
    """Extend ``gm`` (a trace of layers 0 and 1) to ``num_layers`` layers, in place.

    Layer k is layer 1's nodes copied after layer k-1, reading ``{prefix}.{k}.*`` parameters
    and, where layer 1 reads layer 0, layer k-1's copy of the same node. The epilogue then reads
    the last layer. ``layer_params(k)``: layer k's tensors by name relative to the layer
    (``"mlp.up_proj.weight"`` -> (tensor, persistent)).
    """
    if num_layers <= 2:
        return gm
    prefix_dot = prefix + "."
    spans = find_layer_spans(gm)
    partner, carried = _match_layers(spans, prefix_dot)
    second = spans.layer(1)
    epilogue = spans.nodes[spans.second[1]:]
    graph = gm.graph
    # Layer k's parameter reads, in layer 1's order, after layer k-1's (as a full trace has them).
    template_getters = [n for n in graph.nodes
                        if n.op == "get_attr" and layer_of_attr(n.target, prefix_dot) == 1]
    getters: dict[str, fx.Node] = {}
    anchor = template_getters[-1]
    for layer in range(2, num_layers):
        tensors = layer_params(layer)
        for template in template_getters:
            name = _within_layer(template.target, prefix_dot)
            target = f"{prefix_dot}{layer}.{name}"
            if name not in tensors:
                raise NotStampable(f"layer {layer} has no {name} (layer 1 reads it)")
            set_attr(gm, target, *tensors[name])
            with graph.inserting_after(anchor):
                anchor = getters[target] = graph.get_attr(target)
            anchor.meta = dict(template.meta)

    previous = {node: node for node in second}  # layer 1's node -> the previous layer's copy
    insert_after = second[-1]
    for layer in range(2, num_layers):
        env: dict[fx.Node, fx.Node] = {}

        def remap(node: fx.Node, layer: int = layer, env: dict = env) -> fx.Node:
            if node in env:
                return env[node]
            if node in carried:  # layer 1 read layer 0 here: read the previous layer
                return previous[partner[node]]
            if node.op == "get_attr" and layer_of_attr(node.target, prefix_dot) == 1:
                return getters[f"{prefix_dot}{layer}.{_within_layer(node.target, prefix_dot)}"]
            return node  # the prologue's shared values

        for node in second:
            with graph.inserting_after(insert_after):
                copy = graph.node_copy(node, remap)
            copy.meta = _renamed_meta(node.meta, 1, layer)
            env[node] = insert_after = copy
        previous = env
    for node in epilogue:
        for read in list(node.all_input_nodes):
            if read in previous:
                node.replace_input_with(read, previous[read])
    graph.lint()
    gm.recompile()
    return gm


def _renamed_meta(meta: dict, old: int, new: int) -> dict:
    """A copied node's meta with its module-stack paths naming layer ``new``."""
    copied = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        pattern = re.compile(rf"(layers[.\[]){old}(?=[.\]]|$)")
        copied["nn_module_stack"] = {
            f"{key}@{new}": (pattern.sub(rf"\g<1>{new}", str(path)), kind)
            for key, (path, kind) in stack.items()
        }
    return copied


def layer_tensors(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """A layer module's parameters and buffers by relative name, with their persistence."""
    out: dict[str, tuple[torch.Tensor, bool]] = {}
    for name, param in module.named_parameters():
        out[name] = (param, True)
    for name, buffer in module.named_buffers():
        owner, leaf = owner_of(module, name)
        out[name] = (buffer, leaf not in owner._non_persistent_buffers_set)
    return out
