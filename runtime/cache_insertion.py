"""Cache insertion: turn a rewritten (optionally lowered) graph into a paged-KV-cache step function.

``insert_kv_cache(gm, num_blocks=..., block_size=...)`` rewires, in place:

* the graph gains four inputs after ``input_ids``: ``positions`` [B, S] int64, ``slot_mapping``
  [B*S] int64, ``block_tables`` [B, M] int32 and ``context_lens`` [B] int32;
* the position-ids node (the [1|B, S] integer tensor computed from ``arange`` that the rotary
  embedding reads) is replaced by ``positions``;
* every attention core (an SDPA op) becomes ``adp.cached_attention`` on the same q and the k/v
  from *before* GQA's ``repeat_kv``, reading per-layer caches ``kv_cache_{i}_k`` / ``_v``
  (non-persistent buffers of ``gm``); the causal-mask computation dies with the SDPA;
* the LM head (the weight matmul whose output, through reshapes, is the graph's only output)
  reads only the positions an optional ``logits_indices`` input selects: prefill needs the
  logits of a prompt's last token, not of all of them.

``use_fp8_kv_cache(gm)`` afterwards stores the caches as float8_e4m3fn, each layer's
``cached_attention`` reading its fp32 scales ``kv_cache_{i}_k_scale`` / ``_v_scale`` (one-element
buffers; docs/fp8.md, "FP8 KV cache").

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

from adp_pass.fx_vocab import (
    ATTENTION_CORE_OPS,
    RESHAPE_OPS,
    REPEAT_KV_OPS,
    SOFTMAX_OPS,
    attr_source,
    is_op,
)
from adp_pass.runtime.kernels import cached_attention as _cached_attention  # noqa: F401  (registers the op)
from adp_pass.runtime.lower.graph_utils import call, fake_value, same_size, size_arg
from adp_pass.errors import AdpError
from adp_pass.graph_record import CacheRecord, KvLayout, graph_record
from adp_pass.runtime.serving_config import check_kv_cache_scale, kv_cache_torch_dtype

aten = torch.ops.aten
CACHED_ATTENTION = torch.ops.adp.cached_attention.default
NEW_INPUTS = ("positions", "slot_mapping", "block_tables", "context_lens", "query_start_loc",
              "logits_indices")
# Inputs a call may leave out (packed calls pass query_start_loc, prefill calls logits_indices;
# docs/cache_insertion.md), and what a call that leaves one out gets. logits_indices' default is
# a full slice, not None: the LM head then reads ``hidden[:, :]``, a view, so a call without it
# (every decode, CUDA graphs included) runs exactly the graph it ran before.
OPTIONAL_INPUTS = ("query_start_loc", "logits_indices")
_DEFAULTS = {"query_start_loc": None, "logits_indices": slice(None)}
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
    select_logits: bool | None = None,
) -> fx.GraphModule:
    """Insert paged KV caches into ``gm`` in place and return it.

    The result is called as ``gm(input_ids, positions, slot_mapping, block_tables, context_lens)``
    and returns the same logits as before; a packed call (several sequences' tokens in one row,
    ``input_ids [1, T]``) adds ``query_start_loc`` ``[N+1]``, with ``block_tables`` and
    ``context_lens`` per sequence. Caches are ``[num_blocks, block_size, Hkv, D]``,
    zero-initialised, on ``device``/``dtype`` (default: the parameters'). Counts, the KV layout
    and the LM head go to ``graph_record(gm).cache``.

    ``logits_indices`` (int64 ``[R]``, keyword): the graph computes logits only at these
    positions of the sequence dim, ``[B, R, V]`` (a packed call, ``B == 1``: its token rows,
    ``[1, R, V]``). ``select_logits``: None adds that input where the LM head is found
    (``graph_record(gm).cache.lm_head`` says which matmul, ``logits_unsupported`` why not);
    True requires it
    (:class:`CacheInsertionError` if the head is not found); False never adds it.

    An fp8 cache: :func:`use_fp8_kv_cache` afterwards (insert with ``num_blocks=1`` then, so the
    run-dtype cache it replaces is never allocated at full size).
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
    head, unsupported = None, "select_logits=False"
    if select_logits is not False:
        try:
            head = _LmHead(graph, batch, seq)
        except _NoLmHead as err:
            if select_logits:
                raise CacheInsertionError(f"logits_indices: {err}") from None
            unsupported = str(err)

    param = next(gm.parameters(), sites[0].q_val)
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    mode = torch._guards.detect_fake_mode([ids_val])
    names = [n for n in NEW_INPUTS if head is not None or n != "logits_indices"]
    inputs = _add_inputs(graph, input_ids, mode, max(num_blocks, 2), names)
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
    if head is not None:
        head.select_rows(inputs["logits_indices"])

    graph.eliminate_dead_code()
    unpinned = _widen_to_positions(graph, inputs["positions"])
    graph.lint()
    gm.recompile()
    kv = KvLayout(num_blocks, block_size, [s.kv_heads for s in sites],
                  [s.head_dim for s in sites], str(dtype).removeprefix("torch."))
    graph_record(gm).cache = CacheRecord(
        attention_cores=len(sites), position_ids=len(position_ids), kv=kv,
        lm_head=head.matmul.name if head is not None else None,
        logits_unsupported="" if head is not None else unsupported, unpinned_batch=unpinned)
    return gm


def kv_cache_buffers(gm: fx.GraphModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (k_cache, v_cache) pair of every layer, in layer order."""
    count = graph_record(gm).cache.attention_cores
    return [(gm.get_buffer(f"kv_cache_{i}_k"), gm.get_buffer(f"kv_cache_{i}_v")) for i in range(count)]


def kv_cache_scales(gm: fx.GraphModule) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (k_scale, v_scale) pair of every layer of an fp8 cache (fp32 ``[1]`` buffers, in
    layer order); None for a cache in the run dtype."""
    count = graph_record(gm).cache.attention_cores
    if gm.get_buffer("kv_cache_0_k").dtype != getattr(torch, "float8_e4m3fn", None):
        return None
    return [(gm.get_buffer(f"kv_cache_{i}_k_scale"), gm.get_buffer(f"kv_cache_{i}_v_scale"))
            for i in range(count)]


def use_fp8_kv_cache(gm: fx.GraphModule, *, num_blocks: int | None = None,
                     kv_scale: float = 1.0) -> fx.GraphModule:
    """Make the KV caches of a cache-inserted graph fp8, in place: each ``kv_cache_{i}_k`` /
    ``_v`` becomes a zeroed float8_e4m3fn buffer of ``num_blocks`` blocks (default: as many as
    now), and each layer's ``cached_attention`` reads fp32 ``[1]`` scales ``kv_cache_{i}_k_scale``
    / ``_v_scale``, set to ``kv_scale``.

    A pass after the build (as the rank passes are), so a build-cache entry keeps the default
    cache and serves either dtype; prepare_rank builds with a one-block cache first, so the
    run-dtype cache is never allocated at full size.
    """
    record = graph_record(gm).cache
    if record is None:
        raise CacheInsertionError("the graph has no KV cache; run insert_kv_cache first")
    fp8 = kv_cache_torch_dtype("fp8", torch.float32)
    if num_blocks is not None and num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is CACHED_ATTENTION]
    if any("k_scale" in n.kwargs for n in nodes):
        raise CacheInsertionError("the KV cache is fp8 already (use_fp8_kv_cache ran twice)")
    check_kv_cache_scale(kv_scale)
    # Tensors, not floats: the kernels read them on the device (a CUDA graph replays what they
    # hold), and a checkpoint's scales can be copied in later.
    device = gm.get_buffer(nodes[0].args[3].target).device
    scales = [torch.full((1,), float(kv_scale), dtype=torch.float32, device=device)
              for _ in range(2 * len(nodes))]
    for index, node in enumerate(nodes):
        for attr in node.args[3:5]:
            old = gm.get_buffer(attr.target)
            blocks = old.shape[0] if num_blocks is None else num_blocks
            new = torch.zeros((blocks, *old.shape[1:]), dtype=fp8, device=old.device)
            del old  # the run-dtype cache goes before the next layer's fp8 one is allocated
            gm.register_buffer(attr.target, new, persistent=False)
            val = attr.meta.get("val")
            if getattr(val, "fake_mode", None) is not None:
                attr.meta["val"] = val.fake_mode.from_tensor(new, static_shapes=True)
        _add_scales(gm, node, scales[2 * index], scales[2 * index + 1])
    gm.recompile()
    record.kv.dtype = str(fp8).removeprefix("torch.")
    if num_blocks is not None:
        record.kv.num_blocks = num_blocks
    return gm


def _add_scales(gm: fx.GraphModule, node: fx.Node, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Register a layer's scale buffers next to its caches and pass them to its cached_attention."""
    kwargs = {}
    for kind, cache_attr, tensor in (("k", node.args[3], k_scale), ("v", node.args[4], v_scale)):
        name = f"{cache_attr.target}_scale"  # kv_cache_{i}_k_scale, beside kv_cache_{i}_k
        gm.register_buffer(name, tensor, persistent=False)  # the state dict stays the model's
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        val = cache_attr.meta.get("val")
        if getattr(val, "fake_mode", None) is not None:
            attr.meta["val"] = val.fake_mode.from_tensor(tensor, static_shapes=True)
        kwargs[f"{kind}_scale"] = attr
    node.kwargs = {**node.kwargs, **kwargs}


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


# Ops that keep every value of a tensor and the row-major order of its elements: the LM head's
# input and output are reached through these alone, so a row of its output is a row of its input
# times the weight. (Full slices too; a cast is not on the list, it would be dropped.)
_SAME_ROWS_OPS = RESHAPE_OPS | {aten.clone.default, aten.contiguous.default, aten.alias.default}
# Per weight-matmul op (fx_vocab.MATMUL_OPS): the activation's argument index, and those of the
# weight and bias.
_MATMUL_ARGS = {aten.mm.default: (0, (1,)), aten.addmm.default: (1, (0, 2)),
                aten.linear.default: (0, (1, 2))}


class _NoLmHead(Exception):
    """Why the graph has no LM head whose rows ``logits_indices`` can select."""


class _LmHead:
    """The LM head: the weight matmul whose output, through reshapes and copies alone, is the
    graph's one output (logits ``[B, S, V]``), and the ``[B, S, H]`` hidden states (the final
    norm's output) it reads through reshapes, copies and full slices.

    Found from the output, not by name (an untied ``lm_head`` and a tied embedding look the same).
    Between ``hidden`` and the output there is only that matmul, by a module attribute: each
    position's logits depend on its own hidden row alone, so selecting hidden rows before the
    matmul is selecting logits rows after it, and no collective runs after the selection.
    """

    def __init__(self, graph: fx.Graph, batch: Any, seq: Any) -> None:
        self.output = next(n for n in reversed(graph.nodes) if n.op == "output")
        returned: list[fx.Node] = []
        fx.node.map_arg(self.output.args, returned.append)
        if len(returned) != 1:
            raise _NoLmHead(f"the graph returns {len(returned)} tensors; expected the logits alone")
        self.logits = node = returned[0]
        val = node.meta.get("val")
        if not (_is_bsx(val, batch, seq) and val.dtype.is_floating_point):
            raise _NoLmHead(f"the output {node.name} is not [B, S, V] logits")
        self.vocab = val.shape[2]
        chain = [node]  # the logits, the reshapes above them, the matmul
        while is_op(node, _SAME_ROWS_OPS):
            node = node.args[0]
            chain.append(node)
        if not is_op(node, _MATMUL_ARGS):
            raise _NoLmHead(f"the logits come from {node.name} ({node.target}), not from a weight "
                            "matmul through reshapes")
        self.matmul = node
        self.x_index, constant = _MATMUL_ARGS[node.target]
        for index in constant:
            arg = node.args[index] if index < len(node.args) else None
            if arg is not None and not (isinstance(arg, fx.Node) and attr_source(arg) is not None):
                raise _NoLmHead(f"{node.name}'s weight/bias {arg} is not a module attribute")
        out = node.meta.get("val")
        if not (isinstance(out, torch.Tensor) and same_size(out.shape[-1], self.vocab)):
            raise _NoLmHead(f"{node.name} does not make the logits' last dim")
        # The output alone reads the logits, and each of these only the next.
        shared = [n.name for n in chain if len(n.users) != 1]
        if shared:
            raise _NoLmHead(f"{', '.join(shared)} (LM head to output) also feed other nodes")
        self.hidden = self._hidden(node.args[self.x_index], batch, seq)

    def _hidden(self, node: fx.Node, batch: Any, seq: Any) -> fx.Node:
        """The topmost [B, S, H] tensor on the chain of same-rows ops above the matmul's input."""
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise _NoLmHead(f"{self.matmul.name}'s input has no fake value")
        width, found = val.shape[-1], None
        while True:
            val = node.meta.get("val")
            if _is_bsx(val, batch, seq) and same_size(val.shape[2], width):
                found = node
            full_slice = is_op(node, {aten.slice.Tensor}) and _full_slice(node)
            if not (is_op(node, _SAME_ROWS_OPS) or full_slice):
                break
            node = node.args[0]
        if found is None:
            raise _NoLmHead(f"{self.matmul.name} does not read [B, S, H] hidden states")
        return found

    def select_rows(self, indices: fx.Node) -> None:
        """The matmul reads ``hidden[:, indices]`` ([B, R, H], all of it when ``indices`` is the
        default full slice) flattened to rows, and the output is its product ``[B, R, V]``.
        Sizes come from the selection (the views this replaces took B*S from ``input_ids``)."""
        graph = self.matmul.graph
        with graph.inserting_before(self.matmul):
            rows = call(graph, operator.getitem, self.hidden, (slice(None), indices))
            batch, count = size_arg(graph, rows, 0), size_arg(graph, rows, 1)
            # Not reshape(-1): R may be 0 (a chunk that ends no prompt), and -1 is then ambiguous.
            total = (call(graph, operator.mul, batch, count)
                     if isinstance(batch, fx.Node) or isinstance(count, fx.Node) else batch * count)
            flat = call(graph, aten.reshape.default, rows, [total, size_arg(graph, rows, 2)])
        self.matmul.update_arg(self.x_index, flat)
        self.matmul.meta["val"] = fake_value(self.matmul)
        with graph.inserting_before(self.matmul.next):
            vocab = self.vocab if isinstance(self.vocab, int) else size_arg(graph, self.matmul, 1)
            logits = call(graph, aten.view.default, self.matmul, [batch, count, vocab])
        self.output.replace_input_with(self.logits, logits)


def _is_bsx(val: Any, batch: Any, seq: Any) -> bool:
    """A [B, S, X] tensor."""
    return (isinstance(val, torch.Tensor) and val.dim() == 3 and same_size(val.shape[0], batch)
            and same_size(val.shape[1], seq))


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


def _add_inputs(graph: fx.Graph, input_ids: fx.Node, mode: Any, width_hint: int,
                names: list[str]) -> dict[str, fx.Node]:
    """Placeholders ``names`` after ``input_ids`` with fake values over the graph's symbolic B and
    S (and fresh symbols for the block-table width and the number of selected logits rows), so
    later passes can still read shapes."""
    ids_val = input_ids.meta["val"]
    batch, seq = ids_val.shape

    def fresh(hint: int, name: str) -> Any:
        return mode.from_tensor(
            torch.empty(hint),
            symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC]),
            source=ConstantSource(name),
        ).shape[0]

    shapes = {
        "positions": ((batch, seq), torch.int64),
        "slot_mapping": ((batch * seq,), torch.int64),
        "block_tables": ((batch, fresh(width_hint, "adp_block_tables_width")), torch.int32),
        "context_lens": ((batch,), torch.int32),
        "query_start_loc": ((batch + 1,), torch.int32),
    }
    if "logits_indices" in names:
        shapes["logits_indices"] = ((fresh(2, "adp_logits_rows"),), torch.int64)
    nodes, anchor = {}, input_ids
    for name in names:
        with graph.inserting_after(anchor):
            if name in OPTIONAL_INPUTS:
                node = anchor = graph.placeholder(name, default_value=_DEFAULTS[name])
            else:
                node = anchor = graph.placeholder(name)
        size, dtype = shapes[name]
        with mode:
            node.meta["val"] = torch.empty(size, dtype=dtype, device=ids_val.device)
        nodes[name] = node
    return nodes


def _widen_to_positions(graph: fx.Graph, positions: fx.Node) -> list[str]:
    """Give the nodes downstream of ``positions`` their [B, S] values. Where the rotary was traced
    with a literal batch of 1 (transformers <= 5.17 computes it as ``inv_freq.expand(
    position_ids.shape[0], -1, 1) @ position_ids``, and position_ids was ``arange[None]``), the
    shapes cannot widen: those literal 1s become the positions' batch, then the values are
    recomputed; a graph that still does not widen is refused. The names of the widened nodes."""
    try:
        _refresh_meta(graph, positions)
        return []
    except RuntimeError:
        pinned = _unpin_rotary_batch(graph, positions)
    try:
        _refresh_meta(graph, positions, every=True)
    except RuntimeError as err:
        raise CacheInsertionError(
            f"the graph's ops downstream of the position ids do not take [B, S] positions "
            f"({len(pinned)} batch-1 shapes widened: {', '.join(n.name for n in pinned)}): {err}"
        ) from None
    return [n.name for n in pinned]


_SHAPE_OPS = RESHAPE_OPS | {aten.expand.default}


def _unpin_rotary_batch(graph: fx.Graph, positions: fx.Node) -> list[fx.Node]:
    """Replace a literal leading 1 by the positions' batch in the expand/view/reshape sizes of
    the rotary region: the nodes computed from ``positions`` and weights only, and the
    weight-only nodes (``inv_freq``) that feed them. Returns the nodes changed."""
    weights_only: set[fx.Node] = set()
    region: set[fx.Node] = {positions}
    for node in graph.nodes:
        if node.op == "get_attr":
            weights_only.add(node)
        elif node.op == "call_function":
            # Sizes (sym_size nodes) may come from anywhere: only tensor inputs decide.
            inputs = [i for i in node.all_input_nodes if isinstance(i.meta.get("val"), torch.Tensor)]
            if not isinstance(node.meta.get("val"), torch.Tensor):
                continue
            if all(i in weights_only for i in inputs):
                weights_only.add(node)
            elif all(i in weights_only or i in region for i in inputs):
                region.add(node)
    feeding: set[fx.Node] = set()
    stack = [i for n in region for i in n.all_input_nodes if i in weights_only]
    while stack:
        node = stack.pop()
        if node not in feeding:
            feeding.add(node)
            stack.extend(i for i in node.all_input_nodes if i in weights_only)
    pinned = [n for n in graph.nodes if (n in region or n in feeding) and is_op(n, _SHAPE_OPS)
              and isinstance(n.args[1], (list, tuple)) and n.args[1] and n.args[1][0] == 1
              and type(n.args[1][0]) is int]
    if pinned:
        with graph.inserting_before(pinned[0]):
            batch = size_arg(graph, positions, 0)
        for node in pinned:
            node.args = (node.args[0], [batch, *node.args[1][1:]], *node.args[2:])
    return pinned


def _refresh_meta(graph: fx.Graph, root: fx.Node, *, every: bool = False) -> None:
    """Recompute ``meta["val"]`` downstream of ``root`` while values change (``every``: all of
    them, after a failed pass left some stale): [B, S] positions in place of [1, S] position ids
    widen the rotary's cos/sin until they broadcast into q/k."""
    changed = {root}
    for node in graph.nodes:
        if node.op != "call_function" or not changed.intersection(node.all_input_nodes):
            continue
        old, node.meta["val"] = node.meta.get("val"), fake_value(node)
        if every or not _same_values(old, node.meta["val"]):
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
