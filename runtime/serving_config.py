"""The serving geometry of a rank, defined once: KV-cache blocks, positions, batch, CUDA graphs.

Torch-free on purpose: the front end, the launcher and the cost model read these defaults
without importing torch, and the rank-side build (``runtime/prepare.py``) and the build cache
take their geometry from the same record.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServingConfig:
    block_size: int = 16  # tokens per KV-cache block; a sequence takes whole blocks
    num_blocks: int = 256  # KV-cache blocks per rank
    max_position: int = 4096  # rows of the rotary cos/sin table
    max_seq_len: int | None = None  # longest prompt + generation; None: max_position
    max_batch: int = 64  # sequences decoded together
    cuda_graph_sizes: tuple[int, ...] = ()  # decode batch sizes captured as CUDA graphs; (): none
