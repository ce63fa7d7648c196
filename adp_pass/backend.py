"""``torch.compile(tp_model, backend="adp", options={"mapping": "tp=N,attn_dp=1"})``.

Called on every rank of a running TP job with what dynamo hands a backend. The graph is lowered
with AOTAutograd (functional collectives), detected and rewritten to attention-DP; the full
weights are gathered once from the ranks' TP shards. At run time each rank computes only its
share of the batch rows with no per-layer collective, and one all-gather of the outputs returns
the whole batch, so the compiled function means what the TP model meant.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._subclasses.fake_tensor import unset_fake_temporarily

from adp_pass import fp8
from adp_pass.capture import CapturedGraph, params_as_attributes
from adp_pass.graph_record import graph_record
from adp_pass.mapping import Mapping
from adp_pass.pipeline import Pipeline
from adp_pass.plan import Plan
from adp_pass.errors import AdpError

_KEY = re.compile(r"\['([^']+)'\]")


class BackendError(AdpError, RuntimeError):
    """The compiled function cannot run as attention-DP."""


def _source(placeholder: fx.Node) -> str:
    source = placeholder.meta["grapharg"].source
    return source.name if isinstance(source.name, str) else source.name()


def _attribute_name(source: str) -> str | None:
    """``model.layers.0.q_proj.weight`` for a parameter/buffer input, else None."""
    if "._parameters[" not in source and "._buffers[" not in source:
        return None
    return ".".join(_KEY.findall(source)[1:])  # drop the root local (``L['self']``)


# An argument of the compiled function itself (``L['input_ids']``, ``L['kwargs']['input_ids']``),
# not an attribute reached through one.
_ARGUMENT = re.compile(r"^L(\['[^']+'\]|\[\d+\])+$")


def adp_backend(
    gm: fx.GraphModule, example_inputs: list, options: dict | None = None, **_: Any
) -> Callable:
    if not dist.is_initialized():
        raise BackendError("backend='adp' runs inside a TP job: initialise the process group first")
    world, rank = dist.get_world_size(), dist.get_rank()
    mapping = Mapping.load((options or {}).get("mapping") or f"tp={world},attn_dp=1")
    if mapping.world_size != world:
        raise BackendError(
            f"mapping {mapping} is for {mapping.world_size} ranks but the job has {world}"
        )
    if mapping.lockstep_size > 1:
        # Each rank runs its own rows here, unpadded: a mapping that keeps collectives needs
        # the ranks to step together on equal shapes, which the serving engine does.
        raise BackendError(
            f"backend='adp' serves the replicated mapping (tp={world},attn_dp=1); mapping "
            f"{mapping} keeps collectives between ranks: serve it with adp run / prepare_rank"
        )
    names_by_id: dict[int, list[str]] = {}
    user_inputs: list[torch.Tensor] = []
    batch_sizes = []  # dim 0 of each input as dynamo traced it (SymInt when dynamic)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        source = _source(node)
        name = _attribute_name(source)
        if name is not None:
            names_by_id[id(value)] = [name]
        elif isinstance(value, torch.Tensor) and _ARGUMENT.match(source):
            user_inputs.append(value)
            batch_sizes.append(node.meta["example_value"].shape[0])
    if not batch_sizes or not isinstance(batch_sizes[0], torch.SymInt):
        raise BackendError(
            "backend='adp' splits the batch over the DP ranks, so its size must be dynamic: "
            "call torch._dynamo.mark_dynamic(input_ids, 0) before the first call, or compile "
            "with dynamic=True"
        )

    def compile_forward(aot_gm: fx.GraphModule, _inputs: list) -> Callable:
        # AOTAutograd calls this with dynamo's fake mode active; the weights here are real.
        with unset_fake_temporarily():
            return _build(aot_gm)

    def _build(aot_gm: fx.GraphModule) -> Callable:
        pipeline = Pipeline()

        def lift_parameters() -> CapturedGraph:
            module = params_as_attributes(
                aot_gm, example_inputs, names_by_id, {n for v in names_by_id.values() for n in v},
                user_inputs,
            )
            # What capture() records for detect: the traced job's TP degree and this rank.
            record = graph_record(module)
            record.world_size, record.rank = world, rank
            return CapturedGraph(module, rank, world)

        module = pipeline.capture(lift_parameters).gm
        positions = graph_record(module).user_input_positions
        plan = pipeline.detect(module, mapping)
        module = pipeline.rewrite(module, plan,
                                  state_dict=_gather_full_weights(module, plan))
        return make_boxed_func(_RowShare(module, positions, mapping.dp_rank(rank), mapping.dp_size))

    return aot_module_simplified(gm, example_inputs, fw_compiler=compile_forward)


def _gather_full_weights(module: fx.GraphModule, plan: Plan) -> dict:
    """Every sharded parameter assembled from all ranks' shards.

    One all-gather per dtype of all the shards laid end to end, rather than one per parameter:
    dozens of small gloo collectives issued from inside compilation were seen to stall now and
    then on a 2-core machine; one large one is also faster on NCCL."""
    specs = [spec for spec in plan.params if spec.layout != "replicated"]
    locals_ = {spec.name: module.get_parameter(spec.name).detach() for spec in specs}
    full = {}
    for dtype in sorted({t.dtype for t in locals_.values()}, key=str):
        group = [spec for spec in specs if locals_[spec.name].dtype == dtype]
        flat = torch.cat([locals_[spec.name].reshape(-1) for spec in group])
        gathered = fp8.all_gather_bytes(flat)  # an FP8 model's weights: gloo has no float8
        offset = 0
        for spec in group:
            local = locals_[spec.name]
            shards = [g[offset:offset + local.numel()].view(local.shape) for g in gathered]
            full[spec.name] = spec.assemble(shards)
            offset += local.numel()
    return full


class _RowShare:
    """Run the attention-DP graph on this rank's rows; all-gather the rows of every rank."""

    def __init__(self, module: fx.GraphModule, positions: list[int], dp_rank: int, dp_size: int):
        self.module, self.positions = module, positions
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        inputs = [args[i] for i in self.positions]
        batch = inputs[0].shape[0]
        counts = [len(r) for r in torch.arange(batch).tensor_split(self.dp_size)]
        start = sum(counts[: self.dp_rank])
        mine = [t.narrow(0, start, counts[self.dp_rank]) for t in inputs]
        outputs = self.module(*mine)
        if len(outputs) != 1:
            raise BackendError(f"the graph has {len(outputs)} outputs; backend='adp' takes one")
        local = outputs[0]
        # Pad to the largest share so one all-gather carries every rank's rows.
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        gathered = torch.empty((self.dp_size * max(counts), *local.shape[1:]), dtype=local.dtype,
                               device=local.device)
        dist.all_gather_into_tensor(gathered, padded)
        rows = gathered.view(self.dp_size, max(counts), *local.shape[1:])
        return [torch.cat([rows[r, : counts[r]] for r in range(self.dp_size)])]
