"""Start ranks with torchrun's own machinery and collect what each returns.

``launch`` is ``torchrun --standalone --nproc-per-node N`` called from Python (torch's
``elastic_launch``): when one rank fails, torchrun stops the others and the error names the
failing rank. Ranks create their process group with :func:`init_rank`, whose timeout bounds
every collective, so a rank waiting on a dead peer fails instead of hanging.
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


class RankFailed(RuntimeError):
    """A rank of a launched job raised or died; the message names it and its error."""


def launch(
    entrypoint: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Any]:
    """Run ``entrypoint(*args)`` on ``world_size`` local ranks; return their results by rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    os.environ["ADP_TIMEOUT_S"] = str(timeout_s)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        run_id=f"adp-{uuid.uuid4().hex[:8]}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        detail = failure.message
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        raise RankFailed(f"rank {rank} failed: {detail}") from None
    return [results[rank] for rank in range(world_size)]


def rank_device() -> torch.device:
    """This rank's device: its local GPU (made current) or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_rank() -> tuple[int, int, torch.device]:
    """Join the job's default group (NCCL on GPUs, gloo on CPU); return rank, world, device."""
    timeout = timedelta(seconds=float(os.environ.get("ADP_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    device = rank_device()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device
