"""Helpers shared by the lowering passes: pattern tracing, node creation with fake values, census.

Not a pass. Every node a pass inserts gets ``meta["val"]`` computed by running its target on the
fake values of its inputs (in the graph's own fake mode, so symbolic sizes stay symbolic), which
keeps the lowered graph as inspectable as the rewritten one and lets later passes read shapes.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from adp_pass.fx_vocab import copy_graph, is_impure_except_collectives, is_op, metadata_key
from adp_pass.runtime import kernels as _kernels  # noqa: F401  (registers torch.ops.adp.*)
from adp_pass.runtime.kernels import decode_mm as _decode_mm  # noqa: F401  (adp.decode_mm)

aten = torch.ops.aten
adp = torch.ops.adp

# Custom ops the passes emit, by the short name used in the op census.
ADP_OPS = {
    "rms_norm": adp.rms_norm.default,
    "add_rms_norm": adp.add_rms_norm.default,
    "silu_mul": adp.silu_mul.default,
    "silu_mul_fused": adp.silu_mul_fused.default,
    "qk_norm_rope": adp.qk_norm_rope.default,
    # An FP8 graph's linears (adp_pass/fp8_linears.py) and what ``fp8_quant`` makes of them.
    "fp8_block_linear": adp.fp8_block_linear.default,
    "fp8_block_linear_quantized": adp.fp8_block_linear_quantized.default,
    "rms_norm_fp8": adp.rms_norm_fp8.default,
    "add_rms_norm_fp8": adp.add_rms_norm_fp8.default,
    "silu_mul_fp8": adp.silu_mul_fp8.default,
}

# Sentinel eps for tracing patterns: ``scalar_workaround`` turns this literal into a wildcard, so
# one pattern matches any eps. Odd on purpose, so it never collides with another literal.
EPS_SENTINEL = 0.000123456789


class _Missing:
    pass


_MISSING = _Missing()


# ----------------------------------------------------------------------------- pattern tracing
def _no_decompositions() -> dict:
    return {}


def trace_pattern(fn: Callable[..., Any], args: Sequence[Any], **_ignored: Any) -> fx.GraphModule:
    """``fwd_only`` without Inductor's decomposition table, traced once per distinct call.

    The captured graphs keep ``silu``/``mean``/``rsqrt`` as single ATen ops (AOTAutograd with the
    default table), while ``fwd_only``'s default table would decompose e.g. ``silu``, so patterns
    traced with it never match. Extra keyword arguments (``get_decomp_fn``, passed by newer
    ``register_replacement``) are ignored on purpose.

    ``register_replacement`` re-traces the pattern and the replacement on every match's values
    (tens of milliseconds each); inside :func:`traces_reused` a call with the same function and
    the same argument metadata (every decoder layer's) gets a copy of the first trace instead.
    """
    memo = _TRACE_MEMO.get()
    key = _trace_key(fn, args) if memo is not None else None
    if key is not None and key in memo:
        return _copy_module(memo[key])
    gm = _trace(fn, args)
    if key is not None:
        memo[key] = _copy_module(gm)  # the caller may edit its copy (it renames placeholders)
    return gm


def _trace(fn: Callable[..., Any], args: Sequence[Any]) -> fx.GraphModule:
    from torch._inductor.pattern_matcher import fwd_only

    if "get_decomp_fn" in inspect.signature(fwd_only).parameters:
        return fwd_only(fn, args, get_decomp_fn=_no_decompositions)
    from torch.fx.experimental.proxy_tensor import make_fx  # very old torch: same steps by hand

    with torch.no_grad():
        gm = make_fx(fn, {}, tracing_mode="real")(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


_TRACE_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("adp_trace_memo",
                                                                          default=None)


@contextlib.contextmanager
def traces_reused():
    """Pattern traces reused within one lowering (one graph, one fake mode)."""
    token = _TRACE_MEMO.set({})
    try:
        yield
    finally:
        _TRACE_MEMO.reset(token)


def _trace_key(fn: Callable[..., Any], args: Sequence[Any]) -> tuple | None:
    """The function (its code and what its closure holds) and the arguments' metadata; None
    when something has no plain description (then the call is traced)."""
    try:
        cells = []
        for cell in getattr(fn, "__closure__", None) or ():
            value = cell.cell_contents
            cells.append(("fn", id(value)) if callable(value) else metadata_key(value))
        key = (getattr(fn, "__code__", None) or id(fn), tuple(cells), metadata_key(list(args)))
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


def _copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    return fx.GraphModule(gm, copy_graph(gm.graph))


def register(
    search_fn, replace_fn, example_inputs, pass_dict, *, extra_check=None, eps: bool = False
):
    """``register_replacement`` with our trace function (and the eps wildcard when asked)."""
    from torch._inductor.pattern_matcher import register_replacement

    kwargs: dict[str, Any] = {}
    if extra_check is not None:
        kwargs["extra_check"] = extra_check
    if eps:
        kwargs["scalar_workaround"] = {"eps": EPS_SENTINEL}
    return register_replacement(
        search_fn, replace_fn, list(example_inputs), trace_pattern, pass_dict, **kwargs
    )


def apply_patterns(patterns, gm: fx.GraphModule) -> int:
    """``patterns.apply(gm)`` for a ``PatternMatcherPass``, also on meta-device graphs.

    Inductor's ``apply`` skips every node that holds a meta tensor (it guards its own codegen), so
    a weightless capture (``capture_hf_qwen3(..., meta=True)``) would match nothing. For those
    graphs the registry is walked here with ``apply``'s order: nodes last to first, entries in
    registration order, each checked with its ``extra_check`` (which re-traces the pattern).
    """
    if not _holds_meta_tensors(gm.graph):
        return patterns.apply(gm)
    from torch._inductor.pattern_matcher import is_match

    count = 0
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        if node._erased or node.op != "call_function":
            continue
        for entry in patterns.patterns.get((node.op, node.target), ()):
            if node._erased:
                break
            match = entry.pattern.match(node)
            if is_match(match) and entry.extra_check(match):
                entry.apply(match, graph, node)
                count += 1
    return count


def _holds_meta_tensors(graph: fx.Graph) -> bool:
    for node in graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value.device.type == "meta"
    return False


def match_value(match, name: str, default: Any = _MISSING) -> Any:
    """The fake value (or the Python scalar) bound to pattern argument ``name``.

    torch 2.11 runs ``extra_check`` on a re-traced, specialised match in which scalar wildcards
    (eps) are literals and not bound: ``default`` stands in for them there.
    """
    if name not in match.kwargs and default is not _MISSING:
        return default
    arg = match.kwargs[name]
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


# ----------------------------------------------------------------------------- node creation
def fake_value(node: fx.Node) -> Any:
    """Compute ``node``'s value from its inputs' ``meta["val"]`` (None if an input has none)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val", _MISSING))
    leaves = pytree.tree_leaves((args, kwargs))
    if any(leaf is _MISSING for leaf in leaves):
        return None
    mode = torch._guards.detect_fake_mode(leaves)
    with mode if mode is not None else contextlib.nullcontext():
        return node.target(*args, **kwargs)


def call(graph: fx.Graph, target: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point, with its fake value."""
    node = graph.call_function(target, args, kwargs)
    val = fake_value(node)
    if val is not None:
        node.meta["val"] = val
    return node


def fill_missing_values(graph: fx.Graph) -> None:
    """Give every call node without ``meta["val"]`` one (Inductor versions differ in whether the
    nodes a replacement inserts carry the traced values)."""
    for node in graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            value = fake_value(node)
            if value is not None:
                node.meta["val"] = value


def size_arg(graph: fx.Graph, tensor: fx.Node, dim: int) -> Any:
    """Size ``dim`` of ``tensor`` as a graph argument: a literal int, or a ``sym_size`` node."""
    size = tensor.meta["val"].shape[dim]
    if isinstance(size, int):
        return size
    return call(graph, aten.sym_size.int, tensor, dim)


def same_size(a: Any, b: Any) -> bool:
    """True when two (possibly symbolic) sizes are provably equal; never adds a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - sizes from unrelated shape envs: treat as different
        return False


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: index for index, node in enumerate(graph.nodes)}


# ----------------------------------------------------------------------------- bookkeeping
def op_census(graph: fx.Graph) -> dict[str, int]:
    """How many nodes call each ``torch.ops.adp`` op (short names, zero counts included)."""
    counts = dict.fromkeys(ADP_OPS, 0)
    by_target = {target: name for name, target in ADP_OPS.items()}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in by_target:
            counts[by_target[node.target]] += 1
    return counts


def eliminate_dead_code(graph: fx.Graph) -> None:
    graph.eliminate_dead_code(is_impure_node=is_impure_except_collectives)


def getitem(graph: fx.Graph, node: fx.Node, index: int) -> fx.Node:
    return call(graph, operator.getitem, node, index)


def first_body_node(graph: fx.Graph) -> fx.Node:
    """The first node after the placeholders (where new module attributes are read)."""
    for node in graph.nodes:
        if node.op != "placeholder":
            return node
    raise ValueError("graph has no body")


def projection_weight(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` of ``W`` when ``node`` is a projection ``x @ W.T`` by a module attribute:
    ``mm(x, t(W))``, ``addmm(b, x, t(W))``, ``linear(x, W)`` or ``adp.decode_mm(x, W)``; else
    None."""
    if is_op(node, {aten.mm.default}):
        weight = _transposed(node.args[1])
    elif is_op(node, {aten.addmm.default}):
        weight = _transposed(node.args[2])
    elif is_op(node, {aten.linear.default, adp.decode_mm.default}):
        weight = node.args[1]
    else:
        return None
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def _transposed(arg: object) -> fx.Node | None:
    return arg.args[0] if isinstance(arg, fx.Node) and is_op(arg, {aten.t.default}) else None
