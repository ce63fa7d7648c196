"""Start ranks with torchrun's own machinery and collect what each returns.

``launch`` is ``torchrun --standalone --nproc-per-node N`` called from Python (torch's
``elastic_launch``): when one rank fails, torchrun stops the others and the error names the
failing rank. Ranks create their process group with :func:`init_rank`, whose timeout bounds
every collective, so a rank waiting on a dead peer fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from adp_pass.errors import AdpError

DEFAULT_TIMEOUT_S = 120.0


class RankFailed(AdpError, RuntimeError):
    """A rank of a launched job raised or died; the message names it and its error.

    ``rank`` is the failing rank (None if unknown), ``log`` the file with every rank's output."""

    def __init__(self, message: str, *, rank: int | None = None, log: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.rank, self.log = rank, log


def launch(
    entrypoint: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    log_dir: str | os.PathLike | None = None,
) -> list[Any]:
    """Run ``entrypoint(*args)`` on ``world_size`` local ranks; return their results by rank.

    With ``log_dir``, each rank's stdout/stderr go to files under it (torchrun's layout:
    ``<run id>/attempt_0/<rank>/stderr.log``) and torchrun's own messages are silenced, so a
    failure reaches the caller only as :class:`RankFailed` carrying the rank's message.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    os.environ["ADP_TIMEOUT_S"] = str(timeout_s)
    logs = None
    if log_dir is not None:
        logs = DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.ALL, tee=Std.NONE)
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
        logs_specs=logs,
    )
    with _quiet_launcher(log_dir is not None), tempfile.TemporaryDirectory(
            prefix="adp-errors-") as error_dir:
        try:
            results = elastic_launch(config, _recording_errors)(error_dir, entrypoint, *args)
        except ChildFailedError as err:
            rank, detail = _culprit(err.failures, Path(error_dir))
            raise RankFailed(
                f"rank {rank} failed: {_last_line(str(detail))}", rank=rank,
                log=str(log_dir) if log_dir is not None else None,
            ) from None
    return [results[rank] for rank in range(world_size)]


def _recording_errors(error_dir: str, entrypoint: Callable[..., Any], *args: Any) -> Any:
    """Run the rank's entrypoint; on failure, record the error with a precise time first.

    torchrun's own failure records carry one-second timestamps and sometimes miss the rank
    that failed first, so the launcher blames from these records instead."""
    try:
        return entrypoint(*args)
    except BaseException as exc:
        rank = int(os.environ.get("RANK", -1))
        message = f"{type(exc).__name__}: {exc}"
        record = {"rank": rank, "time": time.time(), "message": message,
                  "traceback": traceback.format_exc()}
        with contextlib.suppress(OSError):
            Path(error_dir, f"rank{rank}.json").write_text(json.dumps(record))
        if any(lost in message for lost in _PEER_LOST):
            # Only a peer's disappearance: end here, traceback in this rank's log. Unwinding
            # would restore the console as stderr before the interpreter's teardown, where the
            # collective library's threads abort ("terminate called without an active
            # exception") onto the caller's screen.
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise


# A rank that only lost its peer (the failing rank exited mid-collective) reports one of these;
# torchrun's failure timestamps have one-second resolution, so "first" alone cannot tell.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
              "communicator was aborted", "failed to recv", "Broken pipe")


def _culprit(failures: dict, error_dir: Path) -> tuple[int, str]:
    """The rank whose own error ended the job, and its message: the earliest failure that is
    not just a peer's disappearance (else the earliest). The ranks' own records come first;
    torchrun's (a rank killed by a signal records nothing) fill in."""
    def message(failure) -> str:
        detail = failure.message
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)

    recorded = []
    for path in error_dir.glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            recorded.append((record["time"], record["rank"], record["message"]))
    seen = {rank for _, rank, _ in recorded}
    recorded += [(f.timestamp, rank, message(f)) for rank, f in failures.items()
                 if rank not in seen]
    recorded.sort()
    own = [entry for entry in recorded if not any(s in entry[2] for s in _PEER_LOST)]
    _, rank, text = (own or recorded)[0]
    return rank, text


@contextlib.contextmanager
def _quiet_launcher(quiet: bool):
    """torchrun logs a multi-screen report of a failure; the caller reports it in one line."""
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.multiprocessing",
                                               "torch.distributed.launcher")]
    levels = [logger.level for logger in loggers]
    if quiet:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _last_line(text: str) -> str:
    """A recorded failure may carry the traceback; the exception's own line is the last one."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (a job's store, a rank link)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Where a job's ranks run: "auto" (a GPU each when the machine has GPUs, else the CPU), "cpu"
# (gloo ranks on a GPU machine: the CPU parity jobs) or "cuda". Set by adp --device; ranks
# inherit it from the launcher's environment.
DEVICE_ENV = "ADP_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def job_device() -> str:
    """The job's device kind from ``ADP_DEVICE``: "cpu" or "cuda"."""
    wanted = os.environ.get(DEVICE_ENV, "auto") or "auto"
    if wanted not in DEVICE_CHOICES:
        raise ValueError(f"{DEVICE_ENV}={wanted!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}=cuda but this machine has no CUDA device")
    return wanted


def rank_device() -> torch.device:
    """This rank's device: its local GPU (made current) or the CPU (``job_device``)."""
    if job_device() == "cpu":
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
