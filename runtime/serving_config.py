"""The serving geometry of a rank, defined once: KV-cache blocks, positions, batch, CUDA graphs.

Torch-free on purpose: the front end, the launcher and the cost model read these defaults
without importing torch, and the rank-side build (``runtime/prepare.py``) and the build cache
take their geometry from the same record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adp_pass.errors import UsageError

if TYPE_CHECKING:  # torch is imported on use (see the module docstring)
    import torch

# "auto": the cache holds the run dtype (bf16, fp16, fp32); "fp8": float8_e4m3fn with one K and
# one V scale per layer (docs/fp8.md, "FP8 KV cache").
KV_CACHE_DTYPES = ("auto", "fp8")


class KvCacheDtypeError(UsageError, ValueError):
    """A ``kv_cache_dtype`` / ``kv_cache_scale`` this runtime cannot serve."""


@dataclass(frozen=True)
class ServingConfig:
    block_size: int = 16  # tokens per KV-cache block; a sequence takes whole blocks
    num_blocks: int = 256  # KV-cache blocks per rank
    max_position: int = 4096  # rows of the rotary cos/sin table
    max_seq_len: int | None = None  # longest prompt + generation; None: max_position
    max_batch: int = 64  # sequences decoded together
    cuda_graph_sizes: tuple[int, ...] = ()  # decode batch sizes captured as CUDA graphs; (): none
    # KV-cache element type: "auto" (the run dtype) or "fp8" (float8_e4m3fn, half a bf16 cache's
    # bytes per token); the CLI's --kv-cache-dtype.
    kv_cache_dtype: str = "auto"
    # fp8 only: the scale of every layer's K and V (stored = e4m3(clamp(x / scale, +-448)), read
    # back as fp8 * scale). 1.0 is vLLM's default when a checkpoint gives none.
    kv_cache_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise KvCacheDtypeError(
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}",
                hint="'auto' stores the run dtype, 'fp8' float8_e4m3fn", flag="--kv-cache-dtype")
        check_kv_cache_scale(self.kv_cache_scale)

    def kv_cache_torch_dtype(self, run_dtype: "torch.dtype") -> "torch.dtype":
        """The cache's element type for a run in ``run_dtype``."""
        return kv_cache_torch_dtype(self.kv_cache_dtype, run_dtype)


def check_kv_cache_scale(scale: float) -> None:
    """An fp8 KV cache's scale: a finite number > 0 (a named error otherwise)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            math.isfinite(scale) and scale > 0):
        raise KvCacheDtypeError(f"kv_cache_scale must be a finite number > 0, got {scale!r}",
                                hint="1.0 unless the model's K or V exceed 448 (then larger)")


def kv_cache_torch_dtype(kv_cache_dtype: str, run_dtype: "torch.dtype") -> "torch.dtype":
    """``"auto"`` -> ``run_dtype``; ``"fp8"`` -> ``torch.float8_e4m3fn`` (named error on a torch
    without it, or an unknown name)."""
    import torch

    if kv_cache_dtype == "auto":
        return run_dtype
    if kv_cache_dtype != "fp8":
        raise KvCacheDtypeError(
            f"unknown kv_cache_dtype {kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}",
            flag="--kv-cache-dtype")
    if not hasattr(torch, "float8_e4m3fn"):
        raise KvCacheDtypeError(f"kv_cache_dtype 'fp8' needs torch.float8_e4m3fn, which torch "
                                f"{torch.__version__} lacks",
                                hint="install torch >= 2.1, or serve with kv_cache_dtype 'auto'",
                                flag="--kv-cache-dtype")
    return torch.float8_e4m3fn
