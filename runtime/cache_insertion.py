"""Cache insertion: turn a rewritten (optionally lowered) graph into a paged-KV-cache step function.

``insert_kv_cache(gm, num_blocks=..., block_size=...)`` rewires, in place:

* the graph gains four inputs after ``input_ids``: ``positions`` [B, S] int64, ``slot_mapping``
  [B*S] int64, ``block_tables`` [B, M] int32 and ``context_lens`` [B] int32;
* the position-ids node (the [1|B, S] integer tensor computed from ``arange`` that the rotary
  embedding reads) is replaced by ``positions``;
* every attention core (an SDPA op) becomes ``adp.cached_attention`` on the same q and the k/v
  from *before* GQA's ``repeat_kv``, reading per-layer caches ``kv_cache_{i}_k`` / ``_v``
  (non-persistent buffers of ``gm``); the causal-mask computation dies with the SDPA.

Only the SDPA node, its q/k/v inputs and the position-ids node are relied on, so the pass runs
the same before or after the lowering passes (``adp.qk_norm_rope`` reads the position ids too).
Node walks over the op sets of ``adp_pass/fx_vocab.py``. See docs/cache_insertion.md.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext, statically_known_true

from adp_pass.fx_vocab import ATTENTION_CORE_OPS, REPEAT_KV_OPS, SOFTMAX_OPS, is_op
from adp_pass.runtime.kernels import cached_attention as _cached_attention  # noqa: F401  (registers the op)
from adp_pass.runtime.lower.graph_utils import call, fake_value, same_size
from adp_pass.errors import AdpError

aten = torch.ops.aten
CACHED_ATTENTION = torch.ops.adp.cached_attention.default
NEW_INPUTS = ("positions", "slot_mapping", "block_tables", "context_lens", "query_start_loc")
# Inputs a call may leave out (packed calls pass it; docs/cache_insertion.md).
OPTIONAL_INPUTS = ("query_start_loc",)
_OPEN_END = 2**62

_ARANGE_OPS = {aten.arange.default, aten.arange.start, aten.arange.start_step}


class CacheInsertionError(AdpError, ValueError):
    """The graph does not have the structure the cache-insertion pass needs."""


def insert_kv_cache(
    gm: fx.GraphModule,
    *,
    num_blocks: int,
    block_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> fx.GraphModule:
    """Insert paged KV caches into ``gm`` in place and return it.

    The result is called as ``gm(input_ids, positions, slot_mapping, block_tables, context_lens)``
    and returns the same logits as before; a packed call (several sequences' tokens in one row,
    ``input_ids [1, T]``) adds ``query_start_loc`` ``[N+1]``, with ``block_tables`` and
    ``context_lens`` per sequence. Caches are ``[num_blocks, block_size, Hkv, D]``,
    zero-initialised, on ``device``/``dtype`` (default: the parameters'). Counts go to
    ``gm.meta["adp_cache_counts"]``.
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    graph = gm.graph
    input_ids = _input_ids(graph)
    ids_val = input_ids.meta["val"]
    batch, seq = ids_val.shape
    cores = [n for n in graph.nodes if is_op(n, ATTENTION_CORE_OPS)]
    if not cores:
        hint = ""
        if any(is_op(n, SOFTMAX_OPS) for n in graph.nodes):
            hint = "; it has a softmax: decomposed attention (e.g. captured on meta tensors) is not supported"
        raise CacheInsertionError(f"no attention core (SDPA op) in the graph{hint}")
    position_ids = _position_ids(graph, cores, batch, seq)
    sites = [_Site(core, batch, seq) for core in cores]  # all checks before any mutation

    param = next(gm.parameters(), sites[0].q_val)
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    mode = torch._guards.detect_fake_mode([ids_val])
    inputs = _add_inputs(graph, input_ids, mode, max(num_blocks, 2))
    for node in position_ids:
        node.replace_all_uses_with(inputs["positions"])

    for index, site in enumerate(sites):
        shape = (num_blocks, block_size, site.kv_heads, site.head_dim)
        caches = []
        for kind in ("k", "v"):
            name = f"kv_cache_{index}_{kind}"
            # Non-persistent: the state dict stays the model's. (fx's deepcopy of a GraphModule
            # re-registers its own buffers as persistent; see docs/cache_insertion.md.)
            gm.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            with graph.inserting_before(site.core):
                attr = graph.get_attr(name)
            attr.meta["val"] = mode.from_tensor(gm.get_buffer(name), static_shapes=True)
            caches.append(attr)
        tables = (inputs["slot_mapping"], inputs["block_tables"], inputs["context_lens"])
        with graph.inserting_before(site.core):
            new = call(graph, CACHED_ATTENTION, site.q, site.k, site.v, *caches, *tables, site.scale,
                       inputs["query_start_loc"])
        site.replace_with(new)

    graph.eliminate_dead_code()
    _refresh_meta(graph, inputs["positions"])
    graph.lint()
    gm.recompile()
    gm.meta["adp_cache_counts"] = {"attention_cores": len(sites), "position_ids": len(position_ids)}
    # Per layer, so an engine can size its allocator from the graph alone.
    gm.meta["adp_kv_cache"] = {
        "num_blocks": num_blocks,
        "block_size": block_size,
        "kv_heads": [s.kv_heads for s in sites],
        "head_dim": [s.head_dim for s in sites],
        "dtype": dtype,
    }
    return gm


def kv_cache_buffers(gm: fx.GraphModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (k_cache, v_cache) pair of every layer, in layer order."""
    count = gm.meta["adp_cache_counts"]["attention_cores"]
    return [(gm.get_buffer(f"kv_cache_{i}_k"), gm.get_buffer(f"kv_cache_{i}_v")) for i in range(count)]


class _Site:
    """One attention core: its q, the k/v before repeat_kv, and its scale."""

    def __init__(self, core: fx.Node, batch: Any, seq: Any) -> None:
        self.core = core
        self.q = core.args[0]
        self.q_val = self.q.meta["val"]
        shape = self.q_val.shape
        if len(shape) != 4 or not (same_size(shape[0], batch) and same_size(shape[2], seq)):
            raise CacheInsertionError(f"{core.name}: q {tuple(self.q_val.shape)} is not [B, H, S, D]")
        q_heads, self.head_dim = shape[1], shape[3]
        self.k = _before_repeat_kv(core.args[1], self.q_val)
        self.v = _before_repeat_kv(core.args[2], self.q_val)
        self.kv_heads, v_heads = self.k.meta["val"].shape[1], self.v.meta["val"].shape[1]
        if v_heads != self.kv_heads or q_heads % self.kv_heads:
            raise CacheInsertionError(
                f"{core.name}: k/v heads {self.kv_heads}/{v_heads} do not divide q heads {q_heads}"
            )
        # scale is keyword-only in every SDPA variant.
        scale = core.kwargs.get("scale")
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.readers = self._output_readers()

    def _output_readers(self) -> list[fx.Node]:
        """Nodes to point at the new op: the core itself, or its ``getitem(core, 0)``s."""
        if isinstance(self.core.meta["val"], torch.Tensor):
            return [self.core]
        readers = []
        for user in self.core.users:
            if is_op(user, {operator.getitem}) and user.args[1] == 0:
                readers.append(user)
            elif user.users:
                raise CacheInsertionError(f"{self.core.name}: {user.name} reads an output besides attention's")
        return readers

    def replace_with(self, new: fx.Node) -> None:
        for reader in self.readers:
            reader.replace_all_uses_with(new)
        # Erased by hand: fx's dead-code elimination keeps SDPA ops (tagged nondeterministic_seeded
        # for their dropout), and their unused getitems with them.
        for user in list(self.core.users):
            self.core.graph.erase_node(user)
        self.core.graph.erase_node(self.core)


def _input_ids(graph: fx.Graph) -> fx.Node:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    taken = [n.target for n in placeholders if n.target in NEW_INPUTS]
    if taken:
        raise CacheInsertionError(f"graph already has input(s) {taken}: was the cache inserted already?")
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 2 and not val.dtype.is_floating_point:
            return node
    raise CacheInsertionError("graph has no [B, S] integer input (input_ids)")


def _position_ids(graph: fx.Graph, cores: list[fx.Node], batch: Any, seq: Any) -> list[fx.Node]:
    """Per attention core, the topmost [1|B, S] integer tensor computed only from ``arange`` among
    its q's ancestors (the rotary embedding's input; after lowering, what ``qk_norm_rope``'s
    positions come from). Walks stop at other attention cores, so the causal mask is never seen."""
    from_arange: set[fx.Node] = set()
    order: dict[fx.Node, int] = {}
    for index, node in enumerate(graph.nodes):
        order[node] = index
        tensors = [n for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        computed = node.op == "call_function" and tensors and set(tensors) <= from_arange
        if computed or is_op(node, _ARANGE_OPS):
            from_arange.add(node)
    found: list[fx.Node] = []
    for core in cores:
        seen: set[fx.Node] = set()
        stack, candidates = [core.args[0]], []
        while stack:
            node = stack.pop()
            if node in seen or is_op(node, ATTENTION_CORE_OPS):
                continue
            seen.add(node)
            if node in from_arange and _is_position_ids(node.meta.get("val"), batch, seq):
                candidates.append(node)
            stack.extend(node.all_input_nodes)
        if not candidates:
            raise CacheInsertionError(
                f"no position ids feed {core.name}'s q: expected a [1, S] or [B, S] integer tensor "
                "computed from arange (transformers' cache_position / position_ids)"
            )
        first = min(candidates, key=order.__getitem__)
        if first not in found:
            found.append(first)
    return found


def _is_position_ids(val: Any, batch: Any, seq: Any) -> bool:
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return False
    if val.dtype.is_floating_point or val.dtype == torch.bool:
        return False
    return same_size(val.shape[1], seq) and (same_size(val.shape[0], 1) or same_size(val.shape[0], batch))


def _before_repeat_kv(node: fx.Node, q_val: torch.Tensor) -> fx.Node:
    """The topmost [B, Hkv, S, D] tensor on the layout-op chain above an attention k/v input."""
    best = None
    while True:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 4 and _same_dims(val.shape, q_val.shape, (0, 2, 3)):
            best = node
        partial_slice = is_op(node, {aten.slice.Tensor}) and not _full_slice(node)
        # Only full slices are crossed: a cut one makes another tensor.
        if not is_op(node, REPEAT_KV_OPS) or partial_slice:
            break
        node = node.args[0]
    if best is None:
        raise CacheInsertionError(f"{node.name}: k/v is not [B, H, S, D] like q {tuple(q_val.shape)}")
    return best


def _full_slice(node: fx.Node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    source, dim, start, end, step = args[:5]
    size = source.meta["val"].shape[dim or 0]
    # Open-ended slices end at INT64_MAX, which the shape env cannot compare with a symbolic size.
    to_end = end is None or (isinstance(end, int) and (end >= _OPEN_END or statically_known_true(size <= end)))
    return start in (0, None) and step in (1, None) and to_end


def _add_inputs(graph: fx.Graph, input_ids: fx.Node, mode: Any, width_hint: int) -> dict[str, fx.Node]:
    """Placeholders after ``input_ids`` with fake values over the graph's symbolic B and S (and a
    fresh symbol for the block-table width), so later passes can still read shapes."""
    ids_val = input_ids.meta["val"]
    batch, seq = ids_val.shape
    width = mode.from_tensor(
        torch.empty(width_hint),
        symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC]),
        source=ConstantSource("adp_block_tables_width"),
    ).shape[0]
    shapes = {
        "positions": ((batch, seq), torch.int64),
        "slot_mapping": ((batch * seq,), torch.int64),
        "block_tables": ((batch, width), torch.int32),
        "context_lens": ((batch,), torch.int32),
        "query_start_loc": ((batch + 1,), torch.int32),
    }
    nodes, anchor = {}, input_ids
    for name in NEW_INPUTS:
        with graph.inserting_after(anchor):
            if name in OPTIONAL_INPUTS:
                node = anchor = graph.placeholder(name, default_value=None)
            else:
                node = anchor = graph.placeholder(name)
        size, dtype = shapes[name]
        with mode:
            node.meta["val"] = torch.empty(size, dtype=dtype, device=ids_val.device)
        nodes[name] = node
    return nodes


def _refresh_meta(graph: fx.Graph, root: fx.Node) -> None:
    """Recompute ``meta["val"]`` downstream of ``root`` while values change: [B, S] positions
    in place of [1, S] position ids widen the rotary's cos/sin until they broadcast into q/k."""
    changed = {root}
    for node in graph.nodes:
        if node.op != "call_function" or not changed.intersection(node.all_input_nodes):
            continue
        old, node.meta["val"] = node.meta.get("val"), fake_value(node)
        if not _same_values(old, node.meta["val"]):
            changed.add(node)


def _same_values(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.dim() == b.dim()
            and _same_dims(a.shape, b.shape, range(a.dim()))
            and _same_dims(a.stride(), b.stride(), range(a.dim()))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    return same_size(a, b)


def _same_dims(a, b, dims) -> bool:
    return all(same_size(a[d], b[d]) for d in dims)
