"""Capture: one rank's ATen-level FX graph of a tensor-parallel model.

The graph is what ``torch.compile`` hands a backend, lowered with AOTAutograd: DTensor and
explicit collectives both become functional collectives (``_c10d_functional.all_reduce`` +
``wait_tensor``). Non-strict ``torch.export`` cannot trace DTensor-parallel modules (it fails on
``DTensorSpec``), so dynamo + AOTAutograd is the one capture path for every source.

The captured module holds the rank's (sharded) parameters as attributes named as in the source
model, and takes only the user inputs: symbolic sizes are read off the inputs in the graph.
``fake_process_group`` lets one process trace rank r of an N-rank job; ``meta_device`` lets a
64-layer config be traced without allocating its weights.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from adp_pass.attributes import set_attr
from adp_pass.errors import AdpError
from adp_pass.families import family_of
from adp_pass.graph_record import graph_record

# AOTAutograd and transformers' modeling modules are imported when a capture runs: a rank
# loaded from the build cache imports this module (runtime/prepare.py) but never captures.
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

aten = torch.ops.aten


@dataclass
class CapturedGraph:
    """A rank's ATen graph plus what the later stages need to know about where it came from."""

    gm: fx.GraphModule
    rank: int
    world_size: int
    timings: dict[str, float] = field(default_factory=dict)
    # Decoder layers dynamo traced; the others were stamped from them (adp_pass/stamp.py).
    traced_layers: int | None = None


class CaptureError(AdpError, RuntimeError):
    """The model could not be captured as one ATen graph."""


class _CaptureFinished(Exception):
    """Raised by the recording backend so that nothing is executed after tracing."""


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int) -> Iterator[None]:
    """A ``fake`` default process group, so one process can trace any rank of any world size."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise CaptureError(
            "a default process group already exists; capture with fake_process_group only in a "
            "process without one (or pass the model already parallelised on the real group)"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Logits(torch.nn.Module):
    """Calls a causal LM on input ids and returns its logits tensor (no KV cache)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import PreTrainedModel

        super().__init__()
        self.model = model
        self.from_transformers = isinstance(model, PreTrainedModel)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.from_transformers:  # no KV cache in the graph
            return self.model(input_ids=input_ids, use_cache=False).logits
        out = self.model(input_ids)
        return out.logits if hasattr(out, "logits") else out


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    dynamic: bool = True,
) -> CapturedGraph:
    """Trace ``model(*example_inputs)`` into an ATen graph with functional collectives.

    ``model`` is one rank's TP model (DTensor-parallel or with explicit collectives). Batch and
    sequence dimensions of ``example_inputs`` are symbolic when ``dynamic`` (give sizes >= 2).
    """
    rank = dist.get_rank() if rank is None and dist.is_initialized() else (rank or 0)
    world_size = (
        dist.get_world_size() if world_size is None and dist.is_initialized() else (world_size or 1)
    )
    wrapped = _Logits(model).eval()
    # Every name a tensor has in the source's state dict (tied weights have several), so the
    # rewritten module loads that state dict as it is; non-persistent buffers keep one name.
    state_keys = set(model.state_dict().keys())
    names_by_id: dict[int, list[str]] = {}
    for name, tensor in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        names = names_by_id.setdefault(id(tensor), [])
        if not names or name in state_keys:
            names.append(name)

    recorded: dict[str, object] = {}

    def backend(dynamo_gm: fx.GraphModule, dynamo_inputs: list) -> Callable:
        def record_forward(aot_gm: fx.GraphModule, _inputs: list) -> Callable:
            recorded["gm"] = aot_gm
            raise _CaptureFinished

        from torch._functorch.aot_autograd import aot_module_simplified

        recorded["inputs"] = list(dynamo_inputs)
        return aot_module_simplified(dynamo_gm, dynamo_inputs, fw_compiler=record_forward)

    inputs = list(example_inputs)
    if dynamic:
        for tensor in inputs:
            for dim in range(tensor.dim()):
                torch._dynamo.mark_dynamic(tensor, dim)
    start = time.perf_counter()
    torch._dynamo.reset()
    # dynamic=None: only the marked input dims are symbolic; float attributes (eps) stay constants.
    compiled = torch.compile(wrapped, backend=backend, fullgraph=True, dynamic=None if dynamic else False)
    try:
        with torch.no_grad():
            compiled(*inputs)
    except Exception as err:  # dynamo wraps backend exceptions; find ours in the chain
        if not _caused_by(err, _CaptureFinished):
            raise CaptureError(f"tracing the model failed: {err}") from err
    finally:
        torch._dynamo.reset()
    if "gm" not in recorded:
        raise CaptureError("torch.compile finished without handing a graph to the backend")
    elapsed = time.perf_counter() - start

    gm = params_as_attributes(
        recorded["gm"], recorded["inputs"], names_by_id, state_keys, inputs
    )
    record = graph_record(gm)
    record.world_size, record.rank = world_size, rank
    return CapturedGraph(
        gm=gm,
        rank=rank,
        world_size=world_size,
        timings={"capture_s": elapsed},
    )


def _caused_by(err: BaseException, kind: type) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor behind a DTensor (AOTAutograd flattens DTensors to it)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def params_as_attributes(
    gm: fx.GraphModule,
    dynamo_inputs: list,
    names_by_id: dict[int, list[str]],
    state_keys: set[str],
    user_inputs: list[torch.Tensor],
) -> fx.GraphModule:
    """Turn parameter placeholders into attributes and symbolic-size placeholders into
    ``sym_size`` reads of the user inputs, so the module's only arguments are the inputs."""
    # Opaque objects (a DeviceMesh, the mesh inside a DTensor) reach AOTAutograd as script
    # objects the graph never reads: drop them and pair what is left with the tensors and sizes.
    placeholders = []
    all_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in all_placeholders:
        if isinstance(node.meta.get("val"), (torch.Tensor, torch.SymInt, int)):
            placeholders.append(node)
        elif node.users:
            raise CaptureError(f"graph input {node.name} is an opaque object the graph reads")
        else:
            gm.graph.erase_node(node)
    dynamo_inputs = [v for v in dynamo_inputs if isinstance(v, (torch.Tensor, torch.SymInt, int))]
    if len(placeholders) != len(dynamo_inputs):
        raise CaptureError(
            f"graph has {len(placeholders)} inputs but dynamo passed {len(dynamo_inputs)}: a "
            "tensor subclass other than DTensor flattened to several tensors"
        )
    lifted = 0
    user_nodes: list[fx.Node] = []
    sym_nodes: list[fx.Node] = []
    user_ids = {id(t) for t in user_inputs}
    for node, value in zip(placeholders, dynamo_inputs):
        if isinstance(value, torch.Tensor) and id(value) in names_by_id:
            names = names_by_id[id(value)]
            attr = names[0]
            tensor = _local(value)
            if isinstance(value, torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            for name in names:  # one object under every alias keeps tied weights tied
                set_attr(gm, name, tensor, persistent=name in state_keys)
            with gm.graph.inserting_before(node):
                getter = gm.graph.get_attr(attr)
            getter.meta = dict(node.meta)
            node.replace_all_uses_with(getter)
            gm.graph.erase_node(node)
        elif isinstance(value, torch.Tensor) and id(value) in user_ids:
            user_nodes.append(node)
        elif isinstance(value, (int, torch.SymInt)):
            sym_nodes.append(node)
        elif isinstance(value, torch.Tensor):
            # A tensor dynamo lifted from Python state (not registered on the module).
            attr, lifted = f"_lifted_tensor_{lifted}", lifted + 1
            set_attr(gm, attr, _local(value), persistent=False)
            with gm.graph.inserting_before(node):
                getter = gm.graph.get_attr(attr)
            getter.meta = dict(node.meta)
            node.replace_all_uses_with(getter)
            gm.graph.erase_node(node)
        else:
            raise CaptureError(f"graph input {node.name} has an unsupported value {value!r}")
    for node in sym_nodes:
        _replace_size_placeholder(gm.graph, node, user_nodes)
    # Where the user inputs sit among the compiled function's arguments (a compile backend
    # receives every original argument and passes the user inputs on).
    graph_record(gm).user_input_positions = [all_placeholders.index(n) for n in user_nodes]
    gm.graph.lint()
    gm.recompile()
    return gm


def _replace_size_placeholder(graph: fx.Graph, node: fx.Node, user_nodes: list[fx.Node]) -> None:
    """Replace a SymInt input by ``sym_size(input, dim)`` of the user input that carries it."""
    symbol = node.meta.get("val")
    for user in user_nodes:
        for dim, size in enumerate(user.meta["val"].shape):
            if isinstance(size, torch.SymInt) and str(size) == str(symbol):
                with graph.inserting_after(user_nodes[-1]):
                    size_node = graph.call_function(aten.sym_size.int, (user, dim))
                size_node.meta = dict(node.meta)
                node.replace_all_uses_with(size_node)
                graph.erase_node(node)
                return
    raise CaptureError(f"size input {node.name}={symbol} is not a dimension of any input")


# ----------------------------------------------------------------------------- model sources
# transformers' models of every family in adp_pass/families, made TP with PyTorch's TP API and
# the model's own ``base_model_tp_plan``. The ``*_qwen3`` names are those of earlier versions;
# they take any supported family's config too.
def tp_plan_styles(config: PretrainedConfig) -> dict:
    """The model's own ``base_model_tp_plan`` as ``torch.distributed.tensor.parallel`` styles.

    ColwiseParallel shards a projection's bias with its weight (Qwen2's q/k/v biases)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {}
    for fqn, style in family_of(config).tp_plan(config).items():
        if style.startswith("colwise"):
            styles[fqn] = ColwiseParallel()
        elif style.startswith("rowwise"):
            styles[fqn] = RowwiseParallel()
        # "replicated_with_grad_allreduce" (Qwen3's q/k norms) only matters for training.
    return styles


def parallelize_hf(model: PreTrainedModel, world_size: int) -> PreTrainedModel:
    """Make ``model`` TP over the default group with PyTorch's TP API and the model's own plan."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    device = "cpu" if model.device.type in ("cpu", "meta") else model.device.type
    mesh = init_device_mesh(device, (world_size,))
    parallelize_module(model.model, mesh, tp_plan_styles(model.config))
    return model


def build_hf(
    config: PretrainedConfig,
    seed: int = 0,
    *,
    meta: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """transformers' causal LM of ``config``'s family (``config.model_type``) with random weights
    drawn after ``torch.manual_seed(seed)`` (or on the meta device)."""
    family = family_of(config)
    previous = torch.get_default_dtype()
    # Parameters in ``dtype``; the rotary inv_freq buffer stays fp32 (transformers builds it
    # in fp32 explicitly), as from_pretrained(dtype=...) leaves it. model.to(dtype) would not.
    torch.set_default_dtype(dtype or previous)
    try:
        torch.manual_seed(seed)
        with torch.device("meta" if meta else device):
            return family.build(config)
    finally:
        torch.set_default_dtype(previous)


def capture_hf(
    config: PretrainedConfig,
    world_size: int,
    rank: int,
    *,
    meta: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    batch: int = 2,
    seq: int = 8,
    stamp: bool = True,
    stamped_device: str | torch.device | None = None,
) -> CapturedGraph:
    """Rank ``rank``'s graph of transformers' model of ``config``'s family made TP over a fake
    ``world_size`` group.

    ``stamp``: build and trace two decoder layers and copy the second for the others
    (adp_pass/stamp.py), when every layer is of one type; if the two do not line up, every
    layer is built and traced. Either way the module has every layer's parameters with the
    rank's shard shapes, and their values are not the model's: a fake group scatters no data,
    so the caller fills them (the plan's weight loading, or ``load_state_dict``).
    ``stamped_device``: where the stamped layers' (uninitialised) tensors live, by default with
    the traced ones; ``"meta"`` when the weights are filled through the plan, which
    materialises them (a 64-layer model on one GPU then never holds a throwaway copy).
    """
    stamped = stamp and _stampable(config)
    with fake_process_group(world_size, rank):
        start = time.perf_counter()
        # Stamping: only the two traced layers are built; the others are shapes until the
        # caller fills them (a fake group moves no data, so no capture holds real shards).
        model = build_hf(_two_layers(config) if stamped else config, meta=meta, dtype=dtype,
                         device=device)
        model = parallelize_hf(model, world_size)
        build_s = time.perf_counter() - start
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta" if meta else device)
        captured = None
        if stamped:
            captured = _capture_stamped(model, ids, rank, world_size, config.num_hidden_layers,
                                        stamped_device)
        if captured is None:
            if stamped:  # the two layers did not line up: build and trace every layer
                model = parallelize_hf(build_hf(config, meta=meta, dtype=dtype, device=device),
                                       world_size)
            captured = capture(model, [ids], rank=rank, world_size=world_size)
            captured.traced_layers = config.num_hidden_layers
    captured.timings = {"build_s": build_s, **captured.timings}
    return captured


# Where transformers' causal LMs of every family here keep their decoder layers.
_DECODER_LAYERS = "model.layers"


def _stampable(config: PretrainedConfig) -> bool:
    """More than two layers, all of one type (no sliding-window layers among full ones)."""
    layer_types = getattr(config, "layer_types", None) or []
    return config.num_hidden_layers > 2 and len(set(layer_types)) <= 1


def _two_layers(config: PretrainedConfig) -> PretrainedConfig:
    short = copy.deepcopy(config)
    short.num_hidden_layers = 2
    if getattr(short, "layer_types", None):
        short.layer_types = list(short.layer_types[:2])
    return short


def _capture_stamped(model: PreTrainedModel, ids: torch.Tensor, rank: int, world_size: int,
                     num_layers: int, device: str | torch.device | None) -> CapturedGraph | None:
    """Trace the two-layer model, then stamp layers 2.. (None if its two layers do not line
    up: the caller traces every layer). Stamped layers hold uninitialised tensors shaped as
    layer 1's shards, on ``device`` (None: layer 1's)."""
    from adp_pass.stamp import NotStampable, layer_tensors, stamp_layers

    captured = capture(model, [ids], rank=rank, world_size=world_size)
    template = {}
    layer_one = model.get_submodule(f"{_DECODER_LAYERS}.1")
    for name, (tensor, persistent) in layer_tensors(layer_one).items():
        template[name] = (_local(tensor), isinstance(tensor, torch.nn.Parameter), persistent)

    def layer_params(_layer: int) -> dict[str, tuple[torch.Tensor, bool]]:
        out = {}
        for name, (local, is_param, persistent) in template.items():
            fresh = torch.empty_like(local, device=device)
            out[name] = (torch.nn.Parameter(fresh, requires_grad=False) if is_param else fresh,
                         persistent)
        return out

    start = time.perf_counter()
    try:
        stamp_layers(captured.gm, num_layers, layer_params, prefix=_DECODER_LAYERS)
    except NotStampable as err:
        warnings.warn(f"layer stamping refused ({err}); tracing all {num_layers} layers",
                      stacklevel=3)
        return None
    captured.timings["stamp_s"] = time.perf_counter() - start
    captured.traced_layers = 2
    return captured


def parallelize_hf_qwen3(model: PreTrainedModel, world_size: int) -> PreTrainedModel:
    """:func:`parallelize_hf` (the name of earlier versions)."""
    return parallelize_hf(model, world_size)


def build_hf_qwen3(
    config: PretrainedConfig,
    *,
    meta: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """:func:`build_hf` (the name of earlier versions): Qwen3ForCausalLM for a Qwen3Config."""
    return build_hf(config, seed, meta=meta, dtype=dtype, device=device)


def capture_hf_qwen3(
    config: PretrainedConfig,
    *,
    world_size: int,
    rank: int,
    meta: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    batch: int = 2,
    seq: int = 8,
) -> CapturedGraph:
    """:func:`capture_hf` (the name of earlier versions)."""
    return capture_hf(config, world_size, rank, meta=meta, dtype=dtype, device=device,
                      batch=batch, seq=seq)
