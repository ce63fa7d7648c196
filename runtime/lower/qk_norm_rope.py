"""Lowering pass ``qk_norm_rope``.

Matches: Qwen3's rotary embedding of a per-head-normed projection, for q and k together::

    n = adp.rms_norm(x, w, eps)         # x: [B, S, H, D]   (left by the rms_norm pass)
    t = transpose(n, 1, 2)              # [B, H, S, D]
    out = t * cos + cat([-t[..., D/2:], t[..., :D/2]], -1) * sin

(``rotate_half`` as two ``slice``\\s or a ``split``/``chunk``; either operand order of every mul
and the add; intermediates read by nothing else). ``cos``/``sin`` are ``cos(E)``/``sin(E)`` of one
``E = cat([F, F], -1)``, seen through unsqueeze, dtype casts and a ``mul`` by the attention scaling
(which must be 1: default rope only). ``F = P * inv_freq`` (transformers 5.2x) or
``(inv_freq[None, :, None] @ P[:, None, :]).transpose(1, 2)`` (5.1x), with ``inv_freq`` a module
buffer of ``D/2`` elements and ``P`` the float positions. q and k must share ``cos``/``sin``, eps
and dtype.

q and k are paired through the attention op that reads them (SDPA / flash / efficient / cuDNN,
back through layout ops: view, reshape, clone, expand, unsqueeze, slice, i.e. GQA's
``repeat_kv``); sites no known attention op reads (e.g. SDPA decomposed to bmm/softmax, as on
the meta device) are paired in graph order. The kernel treats q and k alike, so either pairing is
exact.

Replaces with: ``q_out, k_out = adp.qk_norm_rope(x_q.reshape(T, Hq, D), x_k.reshape(T, Hk, D),
w_q, w_k, cos_sin_cache, positions, eps)`` with ``T = B*S``, then
``q_out.view(B, S, Hq, D).transpose(1, 2)`` (and the same for k) takes the old rotated tensors'
place, so the attention op sees the same shapes and strides as before.

* ``cos_sin_cache``: a non-persistent buffer ``adp_rope.cos_sin_cache`` on the module,
  ``[max_position, D]`` in the model dtype, made by ``build_cos_sin_cache`` with the rope theta
  recovered from the ``inv_freq`` buffer's values (checked to reproduce them bit for bit). A
  buffer the default formula does not reproduce (e.g. ``inv_freq`` cast to bf16 by
  ``model.to(bf16)``) is tabulated from its own values with the same steps, which keeps eager's
  numerics.
* ``positions``: the integer tensor behind ``P`` (``position_ids``; or ``P`` itself converted to
  int64 when it is a float ``arange``), broadcast to ``[B, S]`` and flattened to ``[T]``; built once
  and shared by all layers. Positions must stay below ``max_position`` (not checked by the kernel).

Node-walk pass: the rewrite spans two tensors, shares graph-level state (cache, positions) across
layers, and changes layouts, none of which a local replacement pattern expresses.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from adp_pass.fx_vocab import (
    ATTENTION_CORE_OPS,
    RESHAPE_OPS,
    REPEAT_KV_OPS,
    SPLIT_OPS,
    dim_arg,
    is_last_dim,
    is_op,
)
from adp_pass.runtime.kernels import build_cos_sin_cache

from .graph_utils import adp, aten, call, first_body_node, getitem, positions, same_size, size_arg

NAME = "qk_norm_rope"
REQUIRES: tuple[str, ...] = ("rms_norm",)

CACHE_MODULE, CACHE_BUFFER = "adp_rope", "cos_sin_cache"
CACHE_ATTR = f"{CACHE_MODULE}.{CACHE_BUFFER}"  # the first cache's attribute path

@dataclass
class _Rope:
    end: fx.Node  # the add producing the rotated [B, H, S, D] tensor
    x: fx.Node  # rms_norm input, [B, S, H, D]
    weight: fx.Node
    eps: float
    cos: fx.Node  # aten.cos node
    sin: fx.Node
    cos_operand: fx.Node  # what the mul reads (cos after unsqueeze/cast)


@dataclass
class _Freqs:
    inv_freq: fx.Node  # get_attr
    pos: fx.Node  # P: float positions, [..., S, 1] (mul form) or [X, 1, S] (matmul form)
    pos_dim: int  # the size-1 dim of P that is not a position dim


@dataclass
class _State:
    caches: dict = field(default_factory=dict)  # (attr, head_dim, dtype) -> get_attr node
    positions: dict = field(default_factory=dict)  # P -> flat int positions node


def run(gm: fx.GraphModule, ctx) -> int:
    graph = gm.graph
    order = positions(graph)
    sites = {}  # rotated tensor (the rope's add) -> _Rope, in graph order
    plain = []  # rotary embeddings of tensors no q/k RMSNorm produced (Llama, Qwen2)
    adds = graph.find_nodes(op="call_function", target=aten.add.Tensor)
    for add in sorted(adds, key=order.__getitem__):
        try:
            rope = _match_rope(add, plain)
        except (KeyError, AttributeError, IndexError, TypeError):  # e.g. a node without a value
            rope = None
        if rope is not None:
            sites[add] = rope
    if plain:
        names = ", ".join(n.name for n in plain[:4]) + (", ..." if len(plain) > 4 else "")
        ctx.note(NAME, f"{len(plain)} rotary embedding(s) of q/k without a q/k RMSNorm ({names}) "
                 "left as ATen ops: no rope-only kernel")
    pairs, paired = [], set()
    # q and k of one attention op; then, for attention in a form we do not know (e.g. SDPA
    # decomposed to bmm/softmax on the meta device), consecutive sites sharing cos/sin. The op
    # treats q and k alike, so the second way is as correct as the first.
    for attn in (n for n in graph.nodes if is_op(n, ATTENTION_CORE_OPS) and len(n.args) >= 2):
        q, k = (sites.get(_through_layout(arg)) for arg in attn.args[:2])
        if q is not None and k is not None and not {q.end, k.end} & paired and q is not k:
            pairs.append((q, k))
            paired |= {q.end, k.end}
    rest = [site for end, site in sites.items() if end not in paired]
    index = 0
    while index < len(rest):
        first = rest[index]
        second = rest[index + 1] if index + 1 < len(rest) else None
        if second is not None and first.cos is second.cos and first.sin is second.sin:
            pairs.append((first, second))
            index += 2
        else:
            ctx.note(NAME, f"{first.end.name}: rotary site without a partner sharing its cos/sin")
            index += 1
    pairs.sort(key=lambda pair: min(order[pair[0].end], order[pair[1].end]))

    state = _State()
    count = 0
    for q, k in pairs:
        reason = _rewrite(gm, ctx, state, q, k)
        if reason:
            ctx.note(NAME, f"{q.end.name}/{k.end.name}: {reason}")
        else:
            count += 1
    return count


# ----------------------------------------------------------------------------- matching
def _through_layout(node):
    """From an attention input back to the rotated tensor (GQA repeat_kv, contiguity copies)."""
    while isinstance(node, fx.Node) and is_op(node, REPEAT_KV_OPS):
        node = node.args[0]
    return node


def _tensor_args(node: fx.Node, target) -> tuple[fx.Node, fx.Node] | None:
    if not is_op(node, {target}) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None


def _halves(x1: fx.Node, x2: fx.Node, head_dim: int) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(t, internal nodes)`` when x1/x2 are ``t[..., :D/2]`` and ``t[..., D/2:]``."""
    half = head_dim // 2
    if is_op(x1, {aten.slice.Tensor}) and is_op(x2, {aten.slice.Tensor}):
        (t1, d1, s1, e1), (t2, d2, s2, e2) = (_slice_args(x1), _slice_args(x2))
        if t1 is not t2 or not isinstance(t1, fx.Node):
            return None
        rank = t1.meta["val"].dim()
        if not (is_last_dim(d1, rank) and is_last_dim(d2, rank)):
            return None
        if s1 == 0 and e1 == half and s2 == half and (e2 is None or e2 >= head_dim):
            return t1, [x1, x2]
        return None
    if is_op(x1, {operator.getitem}) and is_op(x2, {operator.getitem}):
        split = x1.args[0]
        if split is not x2.args[0] or x1.args[1] != 0 or x2.args[1] != 1 or len(split.users) != 2:
            return None
        if not is_op(split, SPLIT_OPS):
            return None
        t, sizes = split.args[0], split.args[1]
        if not is_last_dim(dim_arg(split, 2), t.meta["val"].dim()):
            return None
        ok = sizes == half if split.target is aten.split.Tensor else list(sizes) == [half, half]
        return (t, [x1, x2, split]) if ok else None
    return None


def _slice_args(node: fx.Node):
    args = list(node.args) + [None] * (4 - len(node.args))
    t, dim, start, end = args[:4]
    return t, (0 if dim is None else dim), (0 if start is None else start), end


def _match_rope(end, plain: list | None = None) -> _Rope | None:
    pair = _tensor_args(end, aten.add.Tensor) if isinstance(end, fx.Node) else None
    if pair is None:
        return None
    for mul_c, mul_s in (pair, pair[::-1]):
        found = _match_rope_muls(end, mul_c, mul_s, plain)
        if found is not None:
            return found
    return None


def _match_rope_muls(
    end: fx.Node, mul_c: fx.Node, mul_s: fx.Node, plain: list | None = None
) -> _Rope | None:
    """The rotary site ending in ``end``; a rotary embedding whose input is not an
    ``adp.rms_norm`` (no q/k norm) is appended to ``plain`` instead."""
    c_args, s_args = _tensor_args(mul_c, aten.mul.Tensor), _tensor_args(mul_s, aten.mul.Tensor)
    if c_args is None or s_args is None:
        return None
    for cat, sin_operand in (s_args, s_args[::-1]):
        if not is_op(cat, {aten.cat.default}) or len(cat.args[0]) != 2:
            continue
        neg, x1 = cat.args[0]
        if not is_op(neg, {aten.neg.default}) or not is_last_dim(dim_arg(cat, 1),
                                                                 cat.meta["val"].dim()):
            continue
        head_dim = cat.meta["val"].shape[-1]
        if not isinstance(head_dim, int) or head_dim % 2:
            continue
        halves = _halves(x1, neg.args[0], head_dim)
        if halves is None:
            continue
        t, half_nodes = halves
        if t not in c_args:
            continue
        cos_operand = c_args[1] if c_args[0] is t else c_args[0]
        if not is_op(t, {aten.transpose.int}) or sorted(t.args[1:]) != [1, 2]:
            continue
        norm = t.args[0]
        if not is_op(norm, {adp.rms_norm.default}):
            if plain is not None and end not in plain:
                plain.append(end)
            continue
        x, weight, eps = norm.args
        if x.meta["val"].dim() != 4 or not isinstance(weight, fx.Node):
            continue
        internal = [norm, t, mul_c, mul_s, cat, neg, *half_nodes]
        inside = set(internal) | {end}
        if any(not set(n.users) <= inside for n in internal):
            continue  # an intermediate is read elsewhere: leave the site alone
        cos = _trig_source(cos_operand, aten.cos.default)
        sin = _trig_source(sin_operand, aten.sin.default)
        if cos is None or sin is None or cos.args[0] is not sin.args[0]:
            continue
        return _Rope(end, x, weight, eps, cos, sin, cos_operand)
    return None


def _trig_source(node, trig) -> fx.Node | None:
    """Walk from what the rotary mul reads to ``cos``/``sin`` through unsqueeze, dtype casts and
    the attention scaling ``mul`` (which must be 1)."""
    while isinstance(node, fx.Node):
        if is_op(node, {trig}):
            return node
        if is_op(node, {aten.unsqueeze.default, aten.alias.default}):
            node = node.args[0]
        elif is_op(node, {aten._to_copy.default}) and set(node.kwargs) <= {"dtype"}:
            node = node.args[0]
        elif is_op(node, {aten.mul.Tensor}) and len(node.args) == 2:
            a, b = node.args
            scalar, tensor = (b, a) if isinstance(a, fx.Node) else (a, b)
            if isinstance(scalar, fx.Node) or scalar != 1:
                return None  # rope scaling other than 1: not default rope
            node = tensor
        else:
            return None
    return None


def _through_to_attr(node) -> fx.Node | None:
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return node
        if is_op(node, {aten._to_copy.default, aten.unsqueeze.default, aten.view.default,
                        aten.expand.default, aten.alias.default, aten.clone.default}):
            node = node.args[0]
        else:
            return None
    return None


def _match_freqs(cos: fx.Node, head_dim: int) -> _Freqs | None:
    """``cos``'s argument as ``cat([F, F], -1)`` with ``F`` the rope frequencies, in either form
    transformers writes them:

    * 5.2x: ``F = position_ids[..., None].float() * inv_freq`` (``mul``, P ``[..., S, 1]``);
    * 5.1x: ``F = (inv_freq[None, :, None].expand(X, -1, 1) @ position_ids[:, None, :].float())
      .transpose(1, 2)`` (``bmm`` + views, P ``[X, 1, S]``). With a contraction of size 1 each
      element is the single product ``inv * p``, so both equal the cache's ``p * inv``.
    """
    cat = cos.args[0]
    if not is_op(cat, {aten.cat.default}) or len(cat.args[0]) != 2:
        return None
    first, second = cat.args[0]
    if first is not second or not is_last_dim(dim_arg(cat, 1), cat.meta["val"].dim()):
        return None
    half = head_dim // 2
    return _freqs_from_mul(first, half) or _freqs_from_bmm(first, half)


def _inv_freq_attr(node, half: int) -> fx.Node | None:
    attr = _through_to_attr(node)
    value = attr.meta.get("val") if attr is not None else None
    if value is None or value.numel() != half:
        return None
    return attr


def _freqs_from_mul(node: fx.Node, half: int) -> _Freqs | None:
    pair = _tensor_args(node, aten.mul.Tensor)
    if pair is None:
        return None
    for pos, inv in (pair, pair[::-1]):
        attr = _inv_freq_attr(inv, half)
        if attr is None or _through_to_attr(pos) is not None or inv.meta["val"].shape[-1] != half:
            continue
        pos_val = pos.meta["val"]
        if pos_val.dim() < 2 or pos_val.shape[-1] != 1:
            continue
        return _Freqs(attr, pos, pos_val.dim() - 1)
    return None


def _freqs_from_bmm(node: fx.Node, half: int) -> _Freqs | None:
    if not is_op(node, {aten.transpose.int}) or node.meta["val"].dim() != 3:
        return None
    if sorted(d % 3 for d in node.args[1:]) != [1, 2]:
        return None
    product = node.args[0]
    while is_op(product, RESHAPE_OPS):
        product = product.args[0]
    if not is_op(product, {aten.bmm.default}):
        return None
    inv, pos = product.args
    attr = _inv_freq_attr(inv, half)
    inv_val = inv.meta["val"]
    if attr is None or inv_val.shape[-2] != half or inv_val.shape[-1] != 1:
        return None
    # Back through broadcasts/reshapes that keep the [X, 1, S] layout, to the float positions.
    while is_op(pos, RESHAPE_OPS | {aten.expand.default}) and _x1s(pos.args[0]):
        pos = pos.args[0]
    if not _x1s(pos) or _through_to_attr(pos) is not None:
        return None
    return _Freqs(attr, pos, 1)


def _x1s(node) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[1] == 1


# ----------------------------------------------------------------------------- rewriting
def _rewrite(gm: fx.GraphModule, ctx, state: _State, q: _Rope, k: _Rope) -> str | None:
    graph = gm.graph
    xq, xk = q.x.meta["val"], k.x.meta["val"]
    batch, seq, n_q, head_dim = xq.shape
    n_k = xk.shape[2]
    if not all(isinstance(v, int) for v in (n_q, n_k, head_dim)) or xk.shape[3] != head_dim:
        return "head counts / head_dim are not static"
    if not (same_size(xk.shape[0], batch) and same_size(xk.shape[1], seq)):
        return "q and k have different [B, S]"
    if q.cos is not k.cos or q.sin is not k.sin:
        return "q and k use different cos/sin"
    if q.eps != k.eps:
        return f"q/k norms have different eps ({q.eps} vs {k.eps})"
    dtype = xq.dtype
    weights = (q.weight.meta["val"], k.weight.meta["val"])
    cos_val = q.cos_operand.meta["val"]
    if any(t.dtype != dtype for t in (xk, *weights, cos_val, k.cos_operand.meta["val"])):
        return "q, k, norm weights and cos/sin do not share one dtype (the kernel needs one)"
    freqs = _match_freqs(q.cos, head_dim)
    if freqs is None:
        return "cos/sin are not cos/sin(cat(P * inv_freq, P * inv_freq))"
    pos_val = freqs.pos.meta["val"]
    pos_dims = [size for index, size in enumerate(pos_val.shape) if index != freqs.pos_dim]
    if not _broadcast_ok(pos_dims, list(cos_val.shape), batch, seq, head_dim):
        return f"cos {list(cos_val.shape)} / positions {pos_dims} do not broadcast as [B, S]"
    order = positions(graph)
    anchor = min(q.end, k.end, key=order.__getitem__)
    needed = [q.x, k.x, q.weight, k.weight, freqs.pos]
    if any(order[n] >= order[anchor] for n in needed):
        return "an input of the fused op is computed after the rotary embedding"

    cache = _cache_node(gm, ctx, state, freqs.inv_freq, head_dim, dtype)
    if isinstance(cache, str):
        return cache
    with graph.inserting_before(anchor):
        b_arg, s_arg = size_arg(graph, q.x, 0), size_arg(graph, q.x, 1)
        pos = state.positions.get(freqs.pos)
        if pos is None:
            pos = _positions_node(graph, freqs, b_arg, s_arg)
            state.positions[freqs.pos] = pos
        q_flat = call(graph, aten.reshape.default, q.x, [-1, n_q, head_dim])
        k_flat = call(graph, aten.reshape.default, k.x, [-1, n_k, head_dim])
        fused = call(
            graph, adp.qk_norm_rope.default, q_flat, k_flat, q.weight, k.weight, cache, pos, q.eps
        )
        outs = []
        for index, heads in ((0, n_q), (1, n_k)):
            flat = getitem(graph, fused, index)
            unflat = call(graph, aten.view.default, flat, [b_arg, s_arg, heads, head_dim])
            outs.append(call(graph, aten.transpose.int, unflat, 1, 2))
    for rope, new in zip((q, k), outs):
        new.meta.update({key: v for key, v in rope.end.meta.items() if key != "val"})
        rope.end.replace_all_uses_with(new)
    return None


def _broadcast_ok(pos_dims: list, cos_shape: list, batch, seq, head_dim: int) -> bool:
    """cos (shape right-aligned with q's ``[B, H, S, D]``) must vary only over the positions'
    dims: positions ``[S]`` with cos ``[S, D]`` / ``[1, S, D]`` / ``[1, 1, S, D]``, or positions
    ``[X, S]`` (``X`` 1 or B) with cos ``[X, 1, S, D]``."""
    if not pos_dims or not same_size(pos_dims[-1], seq):
        return False
    if not (cos_shape and cos_shape[-1] == head_dim and len(cos_shape) >= 2):
        return False
    if not same_size(cos_shape[-2], seq) or any(size != 1 for size in cos_shape[:-2][1:]):
        return False
    if len(pos_dims) == 1:
        return all(size == 1 for size in cos_shape[:-2])
    if len(pos_dims) != 2 or len(cos_shape) != 4:
        return False
    lead = pos_dims[0]
    lead_ok = lead == 1 or same_size(lead, batch)
    return lead_ok and same_size(cos_shape[0], lead) and cos_shape[1] == 1


def _positions_node(graph: fx.Graph, freqs: _Freqs, b_arg, s_arg) -> fx.Node:
    """Flat int64 ``[B*S]`` positions from the float positions ``P`` feeding inv_freq."""
    pos = source = freqs.pos
    if is_op(pos, {aten._to_copy.default}) and set(pos.kwargs) <= {"dtype"}:
        inner = pos.args[0]
        if isinstance(inner, fx.Node) and not inner.meta["val"].dtype.is_floating_point:
            source = inner  # position_ids itself: skip the float round trip
    squeezed = call(graph, aten.squeeze.dim, source, freqs.pos_dim)
    expanded = call(graph, aten.expand.default, squeezed, [b_arg, s_arg])
    flat = call(graph, aten.reshape.default, expanded, [-1])
    if flat.meta["val"].dtype != torch.int64:
        flat = call(graph, aten._to_copy.default, flat, dtype=torch.int64)
    return flat


def _cache_node(gm: fx.GraphModule, ctx, state: _State, inv_attr: fx.Node, head_dim: int, dtype):
    key = (inv_attr.target, head_dim, dtype)
    if key in state.caches:
        return state.caches[key]
    inv_freq = _get_attr(gm, inv_attr.target)
    if not isinstance(inv_freq, torch.Tensor):
        return f"{inv_attr.target} is not a tensor attribute"
    device = inv_freq.device
    if inv_freq.is_meta:
        cache, how = torch.empty(ctx.max_position, head_dim, dtype=dtype, device=device), "meta"
    else:
        theta = rope_theta_of(inv_freq, head_dim)
        if theta is not None:
            cache = build_cos_sin_cache(ctx.max_position, head_dim, theta, dtype, device)
            how = f"build_cos_sin_cache(rope_theta={theta:g})"
        else:
            cache = cos_sin_cache_from_inv_freq(inv_freq, ctx.max_position, dtype, device)
            how = f"tabulated from {inv_attr.target} ({inv_freq.dtype})"
    name = _register_cache(gm, cache)
    graph = gm.graph
    with graph.inserting_before(first_body_node(graph)):
        node = graph.get_attr(name)
    mode = torch._guards.detect_fake_mode([v for v in (inv_attr.meta.get("val"),) if v is not None])
    if mode is not None:
        node.meta["val"] = mode.from_tensor(cache, static_shapes=True)
    ctx.info.setdefault("cos_sin_cache", {})[name] = {
        "shape": list(cache.shape),
        "dtype": str(dtype),
        "source": how,
    }
    state.caches[key] = node
    return node


def _register_cache(gm: fx.GraphModule, cache: torch.Tensor) -> str:
    """Register ``cache`` as a non-persistent buffer of the child module ``adp_rope``; returns its
    attribute path. A child module, because fx re-registers a GraphModule's *own* buffers as
    persistent when it copies one (``deepcopy``, ``GraphModule(root, graph)``), which would put
    the cache in the state dict; a child module is copied whole, flags included."""
    holder = getattr(gm, CACHE_MODULE, None)
    if not isinstance(holder, torch.nn.Module):
        holder = torch.nn.Module()
        gm.add_module(CACHE_MODULE, holder)
    leaf, index = CACHE_BUFFER, 0
    while hasattr(holder, leaf):
        index += 1
        leaf = f"{CACHE_BUFFER}_{index}"
    holder.register_buffer(leaf, cache, persistent=False)
    return f"{CACHE_MODULE}.{leaf}"


def _get_attr(gm: torch.nn.Module, dotted: str):
    obj = gm
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def rope_theta_of(inv_freq: torch.Tensor, head_dim: int) -> float | None:
    """The ``rope_theta`` whose default-rope ``inv_freq`` equals this buffer bitwise, or None."""
    if inv_freq.dtype != torch.float32 or inv_freq.numel() != head_dim // 2 or head_dim < 4:
        return None
    inv = inv_freq.detach().reshape(-1).cpu()
    if inv[0].item() != 1.0 or not (0 < inv[1].item() < 1):
        return None
    estimate = float(inv[1].double().item()) ** (-head_dim / 2)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
    candidates = [float(f"{estimate:.{digits}g}") for digits in (3, 4, 5, 6, 7, 8)]
    candidates += [float(round(estimate)), estimate]
    for theta in candidates:
        if math.isfinite(theta) and theta > 1 and torch.equal(1.0 / (theta**exponents), inv):
            return theta
    return None


def cos_sin_cache_from_inv_freq(
    inv_freq: torch.Tensor, max_position: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """``build_cos_sin_cache``'s steps with a given ``inv_freq`` (upcast to fp32, as eager does)."""
    pos = torch.arange(max_position, dtype=torch.int64, device=device).float()
    inv = inv_freq.detach().reshape(-1).to(device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
