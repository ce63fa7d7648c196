"""Build one rank's serving model: capture → detect → rewrite → weights → lower → KV cache.

Runs inside a rank *before* it joins the job's process group: the rank traces its own graph of
the TP job on a fake group (``capture_hf_qwen3``), so no peer is needed to build it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Qwen3Config

from adp_pass.capture import capture_hf_qwen3
from adp_pass.detect import detect
from adp_pass.mapping import Mapping
from adp_pass.plan import Plan
from adp_pass.rewrite import rewrite
from adp_pass.runtime.kv_cache import PagedKVCache


@dataclass
class RankModel:
    model: torch.fx.GraphModule
    cache: PagedKVCache
    plan: Plan
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)


def prepare_rank(
    config: Qwen3Config,
    mapping: Mapping | str,
    rank: int,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    checkpoint: str | Path | None = None,
    num_blocks: int = 256,
    block_size: int = 16,
    max_position: int = 4096,
    lower_ops: bool = True,
    seed: int = 0,
) -> RankModel:
    """The rank's cache-inserted graph and its paged KV cache.

    Weights come from a Hugging Face ``checkpoint`` directory, or are random (seeded, equal on
    every rank) for demos and benchmarks.
    """
    from adp_pass.runtime.cache_insertion import insert_kv_cache
    from adp_pass.runtime.lower import lower
    from adp_pass.runtime.weights import (
        check_memory,
        kv_cache_bytes,
        load_checkpoint,
        random_weights,
    )

    mapping = Mapping.load(mapping)
    mapping.check_model(
        config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Traced on the target device (not meta): SDPA then stays one op per layer.
    captured = capture_hf_qwen3(
        config, world_size=mapping.tp_size, rank=rank, dtype=dtype, device=device
    )
    timings["capture_s"] = time.perf_counter() - start
    plan = detect(captured.gm, mapping)
    # Before rewrite allocates the rank's weights: refused with the numbers and a mapping
    # that fits. Each rank's cache holds its attention group's share of the kv heads.
    kv_heads = config.num_key_value_heads // mapping.attn_tp_size
    kv_bytes = kv_cache_bytes(config.num_hidden_layers, kv_heads, config.head_dim, num_blocks,
                              block_size, dtype)
    check_memory(plan, kv_cache_bytes=kv_bytes, device=device, dtype=dtype)
    gm = rewrite(captured.gm, plan)
    timings["rewrite_s"] = time.perf_counter() - start - timings["capture_s"]

    mark = time.perf_counter()
    if checkpoint is not None:
        load_checkpoint(gm, plan, checkpoint, device=device, dtype=dtype)
    else:
        random_weights(gm, plan, seed=seed, device=device, dtype=dtype, config=config)
    timings["weights_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    counts: dict[str, dict] = {"sites": plan.counts()}
    if lower_ops:
        gm = lower(gm, max_position=max_position)
        counts["lower"] = dict(gm.meta.get("adp_lower_counts", {}))
    gm = insert_kv_cache(gm, num_blocks=num_blocks, block_size=block_size, device=device,
                         dtype=dtype)
    counts["cache"] = dict(gm.meta.get("adp_cache_counts", {}))
    timings["lower_s"] = time.perf_counter() - mark
    layers = range(config.num_hidden_layers)
    cache = PagedKVCache.over(
        [gm.get_buffer(f"kv_cache_{i}_k") for i in layers],
        [gm.get_buffer(f"kv_cache_{i}_v") for i in layers],
    )
    return RankModel(gm, cache, plan, timings, counts)

