"""A serving job as plain data: the model, the mapping, the cache, and each DP group's requests.

The front end writes it as JSON, every torchrun rank reads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adp_pass.presets import qwen3_config
from adp_pass.runtime.engine import Request
from adp_pass.runtime.sampling import SamplingParams

if TYPE_CHECKING:  # the launcher (adp run over several ranks) writes jobs without transformers
    from transformers import PretrainedConfig


@dataclass
class Job:
    mapping: str
    preset: str = "tiny"
    checkpoint: str | None = None  # a Hugging Face checkpoint dir; its config.json wins
    dtype: str = "float32"
    num_blocks: int = 256
    block_size: int = 16
    max_position: int = 4096
    max_seq_len: int | None = None
    max_batch: int = 64
    cuda_graph_sizes: list[int] = field(default_factory=list)
    seed: int = 0
    check_first_step: bool = False
    # Build cache of the ranks' built graphs (runtime/build_cache.py, docs/build_cache.md): a
    # rank loads its entry from here, or builds and stores it; None: build, store nothing.
    cache_dir: str | None = None
    # Each rank writes its build stages' graphs as text to <dump_dir>/rank<r>/ (adp run
    # --dump-dir); None: nothing written.
    dump_dir: str | None = None
    # per DP group (mapping.dp_size of them; every rank of an attention group serves its group's
    # list): [{"request_id", "prompt", "max_new_tokens", "temperature", "top_p", "stop"}]
    assignments: list[list[dict]] = field(default_factory=list)
    # More workloads served one after the other by the same built ranks (benchmarks): each a
    # list like ``assignments``; each is measured on its own.
    later_phases: list[list[list[dict]]] = field(default_factory=list)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def config(self) -> PretrainedConfig:
        if self.checkpoint is not None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.checkpoint)
            config._attn_implementation = "sdpa"
            config.use_cache = False
            return config
        return qwen3_config(self.preset)

    def requests_for(self, dp_rank: int, phase: int = 0) -> list[Request]:
        """The requests of DP group ``dp_rank`` (``Mapping.dp_rank(rank)``) in workload
        ``phase`` (0: ``assignments``)."""
        assignments = self.assignments if phase == 0 else self.later_phases[phase - 1]
        if dp_rank >= len(assignments):
            return []
        return [
            Request(
                item["request_id"],
                list(item["prompt"]),
                SamplingParams(
                    max_new_tokens=item.get("max_new_tokens", 16),
                    temperature=item.get("temperature", 0.0),
                    top_p=item.get("top_p", 1.0),
                    stop_token_ids=tuple(item.get("stop", ())),
                    seed=item.get("seed"),
                ),
            )
            for item in assignments[dp_rank]
        ]

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: str | Path) -> "Job":
        return cls(**json.loads(Path(path).read_text()))


def request_dict(request: Request) -> dict:
    p = request.params
    return {
        "request_id": request.request_id,
        "prompt": list(request.prompt),
        "max_new_tokens": p.max_new_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stop": list(p.stop_token_ids),
        "seed": p.seed,
    }
