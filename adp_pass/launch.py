"""The one launcher: every way ranks start, with one failure record and one log capture.

Ways ranks start (each with torchrun's machinery, so a failed rank stops its job's others):

- :func:`launch`: a Python function on N local ranks (``elastic_launch``; ``adp verify``,
  ``adp calibrate``, tests), their return values collected;
- a worker module (``runtime/worker.py``, ``runtime/serve_worker.py``) over a job directory:
  :func:`torchrun_command` builds the command line of each form — one standalone job of N ranks
  (``adp run --torchrun``, ``adp serve`` with collectives), one job per rank (isolated serving
  ranks), one agent per node meeting at a c10d rendezvous (``adp serve --nnodes``) — and
  ``runtime/in_process.py`` runs the same in this process (the one rank of a one-rank job, or
  torchrun's agent).

Every rank that fails leaves one :class:`~adp_pass.runtime.contract.RankFailure`
(:func:`record_failure`); :func:`job_failure` turns the first into :class:`RankFailed`. Every
process's output goes through :func:`pump_lines` into the job's log, the ranks' progress lines
echoed. Ranks create their process group with :func:`init_rank`, whose timeout bounds every
collective, so a rank waiting on a dead peer fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
            rank, detail, hint = _culprit(err.failures, Path(error_dir))
            raise RankFailed(
                f"rank {rank} failed: {_last_line(str(detail))}", rank=rank,
                log=str(log_dir) if log_dir is not None else None, hint=hint,
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
        record_failure(error_dir, rank, exc)
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


def _culprit(failures: dict, error_dir: Path) -> tuple[int, str, str | None]:
    """The rank whose own error ended the job, its message and its fix (the error's ``hint``,
    where it had one): the earliest failure that is not just a peer's disappearance (else the
    earliest). The ranks' own records come first; torchrun's (a rank killed by a signal records
    nothing) fill in."""
    def message(failure) -> str:
        detail = failure.message
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)

    from adp_pass.runtime.contract import ContractError, RankFailure, from_json

    recorded = []
    for path in error_dir.glob("rank*.error.json"):
        with contextlib.suppress(OSError, ValueError, ContractError):
            failure = from_json(RankFailure, json.loads(path.read_text()))
            recorded.append((failure.time, failure.rank, f"{failure.type}: {failure.message}",
                             failure.hint))
    seen = {entry[1] for entry in recorded}
    recorded += [(f.timestamp, rank, message(f), None) for rank, f in failures.items()
                 if rank not in seen]
    recorded.sort(key=lambda entry: entry[:3])
    own = [entry for entry in recorded if not any(s in entry[2] for s in _PEER_LOST)]
    _, rank, text, hint = (own or recorded)[0]
    return rank, text, hint


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


def record_failure(job_dir: str | os.PathLike, rank: int, err: BaseException) -> None:
    """Leave rank ``rank``'s own error where :func:`job_failure` looks for it (torchrun reports
    only an exit code for a ``-m`` module)."""
    from adp_pass.runtime.contract import RankFailure, to_json

    failure = RankFailure.of(rank, err)
    with contextlib.suppress(OSError):
        failure.path(job_dir).write_text(json.dumps(to_json(failure)))


def job_failure(job_dir: str | os.PathLike, returncode: int, log: str | os.PathLike
                ) -> RankFailed:
    """The error of a job that exited ``returncode``: its first rank's own, when one left it."""
    from adp_pass.runtime.contract import ContractError, RankFailure, from_json

    failures = []
    for path in Path(job_dir).glob("rank*.error.json"):
        with contextlib.suppress(OSError, ValueError, ContractError):
            failures.append(from_json(RankFailure, json.loads(path.read_text())))
    if not failures:
        return RankFailed(
            f"the job's ranks exited (code {returncode}) without an error message: killed, or "
            "out of memory?", log=str(log), hint=f"every rank's output is in {log}")
    first = min(failures, key=lambda f: f.time)
    return RankFailed(f"rank {first.rank} failed: {first.type}: {first.message}",
                      rank=first.rank, log=str(log), hint=first.hint)


def torchrun_command(worker: str, job_dir: str | os.PathLike, nproc: int, *, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, run_id: str | None = None) -> list[str]:
    """The command line of a torchrun job running ``worker`` (a module) over ``job_dir``: one
    standalone job of ``nproc`` ranks, or with ``rdzv_endpoint`` one of ``nnodes`` agents of
    ``nproc`` ranks each, meeting at a c10d rendezvous (torchrun hands out the ranks in the
    order the agents join)."""
    if rdzv_endpoint is None:
        placement = ["--standalone", f"--nproc-per-node={nproc}"]
    else:
        placement = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={run_id}",
                     "--max-restarts=0"]
    job = Path(job_dir)
    return [sys.executable, "-m", "torch.distributed.run", *placement, "--monitor-interval=0.2",
            "-m", worker, str(job / "job.json"), str(job)]


def rank_environment(**extra: str) -> dict[str, str]:
    """The environment a rank process starts with: this one's, one CPU thread per rank unless
    told (ranks share the machine's cores), and ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **extra)
    if "ADP_SERVE_RANK" not in extra:
        env.pop("ADP_SERVE_RANK", None)
    return env


def pump_lines(lines, sink, echo_to=None, lock=None) -> None:
    """Each line of ``lines`` into the log ``sink`` (flushed, so the log is whole up to there
    even if this process dies); the ranks' own progress lines (``[rank N ...]``) also to the
    stream ``echo_to``, if given. ``lock`` serialises writers sharing one log."""
    for line in lines:
        with lock if lock is not None else contextlib.nullcontext():
            sink.write(line)
            sink.flush()
        if echo_to is not None and line.startswith("[rank "):
            with contextlib.suppress(Exception):
                echo_to.write(line)
                echo_to.flush()


def default_log_path(kind: str = "run", suffix: str = ".log") -> Path:
    """Where a job's rank logs go unless told: one file (or, with ``suffix=""``, directory) per
    job under the temp dir."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "adp-logs" / f"{kind}-{stamp}-{os.getpid()}{suffix}"


def run_logged(command: list[str], env: dict, log: Path, timeout_s: float, echo: bool) -> int:
    """Run ``command`` with its output into ``log``; show rank progress lines; kill the whole
    process group (torchrun and its ranks) on timeout."""
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        timer = threading.Timer(timeout_s, kill_group, [process])
        timer.start()
        try:
            pump_lines(process.stdout, sink, sys.stderr if echo else None)
            returncode = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:  # interrupted: take the ranks down with us
                kill_group(process, timed_out=False)
    if getattr(process, "timed_out", False):
        raise RankFailed(f"the job did not finish within {timeout_s:.0f} s", log=str(log),
                         hint=f"every rank's output is in {log}")
    return returncode


def kill_group(process: subprocess.Popen, timed_out: bool = True) -> None:
    process.timed_out = timed_out
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


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
