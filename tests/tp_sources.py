"""The two independent TP sources the pass must accept, built for tests.

``hf``: transformers' Qwen3ForCausalLM + torch.distributed.tensor.parallel (its own plan).
``engine``: the engine-style fixture in engine_qwen3.py (fused projections, vocab-parallel
embedding, all-gathered LM head). Both return rank r's captured graph and the unsharded state
dict the rewritten module must load.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import Qwen3Config

from adp_pass.capture import CapturedGraph, build_hf_qwen3, capture, capture_hf_qwen3
from adp_pass.capture import fake_process_group
from engine_qwen3 import EngineQwen3ForCausalLM, engine_state_dict_from_hf

SOURCES = ("hf", "engine")


def reference_state(config: Qwen3Config, seed: int = 0) -> dict[str, torch.Tensor]:
    return build_hf_qwen3(config, seed=seed).state_dict()


def unsharded_state(source: str, config: Qwen3Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of the source's own unsharded model (engine: fused layouts)."""
    state = reference_state(config, seed)
    return state if source == "hf" else engine_state_dict_from_hf(state, config, 1, 0)


def engine_tp_model(config: Qwen3Config, world_size: int, rank: int, seed: int = 0):
    model = EngineQwen3ForCausalLM(config, world_size, rank, dist.group.WORLD.group_name)
    shard = engine_state_dict_from_hf(reference_state(config, seed), config, world_size, rank)
    model.load_state_dict(shard)
    return model.eval()


def capture_source(
    source: str, config: Qwen3Config, world_size: int, rank: int, *, batch: int = 2, seq: int = 8
) -> CapturedGraph:
    """Rank ``rank``'s graph of an N-rank TP job, traced in this process on a fake group."""
    if source == "hf":
        return capture_hf_qwen3(config, world_size=world_size, rank=rank, batch=batch, seq=seq)
    with fake_process_group(world_size, rank):
        model = engine_tp_model(config, world_size, rank)
        ids = torch.zeros(batch, seq, dtype=torch.long)
        return capture(model, [ids], rank=rank, world_size=world_size)


def engine_tp_source(config: Qwen3Config, world_size: int, rank: int, seed: int):
    """``adp_pass.verify`` source for the engine fixture (runs inside a real rank)."""
    model = engine_tp_model(config, world_size, rank, seed)
    return model, unsharded_state("engine", config, seed)


# ----------------------------------------------------------------------------- FP8 source
def fp8_full_state(config: Qwen3Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """The unsharded FP8 model's tensors: transformers' seeded model, decoder linears quantized."""
    from engine_qwen3 import fp8_state_from_reference

    return fp8_state_from_reference(reference_state(config, seed))


def fp8_tp_model(config: Qwen3Config, world_size: int, rank: int,
                 full: dict[str, torch.Tensor] | None = None, group_name: str | None = None):
    """Rank ``rank``'s FP8 engine-style TP model, its shards cut from ``full`` (the unsharded
    FP8 tensors, transformers' names, scales as float32; default: the seeded model's)."""
    from engine_qwen3 import Fp8EngineQwen3ForCausalLM, fp8_shard_state

    if world_size > 1 and group_name is None:
        group_name = dist.group.WORLD.group_name
    model = Fp8EngineQwen3ForCausalLM(config, world_size, rank, group_name)
    full = fp8_full_state(config) if full is None else full
    model.load_state_dict(fp8_shard_state(full, config, world_size, rank), strict=True)
    return model.eval()


def capture_fp8_source(config: Qwen3Config, world_size: int, rank: int, *, batch: int = 2,
                       seq: int = 8, full: dict[str, torch.Tensor] | None = None
                       ) -> CapturedGraph:
    """Rank ``rank``'s graph of the FP8 TP job, traced in this process on a fake group."""
    with fake_process_group(world_size, rank):
        model = fp8_tp_model(config, world_size, rank, full)
        ids = torch.zeros(batch, seq, dtype=torch.long)
        return capture(model, [ids], rank=rank, world_size=world_size)
