"""A serving job's ranks started from this process instead of a ``torchrun`` subprocess.

Each interpreter on the way to a rank imports torch (seconds each; more with transformers), and
the ``torchrun`` subprocess of ``run_job`` was one more such interpreter between ``adp run`` and
its ranks. So, from the main thread of a process without a process group of its own:

* a one-rank job runs its rank right here (``serve_here``): no torchrun, no second
  interpreter; the rank's one-process group is set up from torchrun's environment variables;
* a larger job runs torchrun's agent right here (``torch.distributed.run.run``, the function
  behind the ``torchrun`` command, with the same arguments); the ranks are its subprocesses.

What the caller sees stays as under the subprocess: ``output_into`` sends this process's output
(file descriptors 1 and 2, so the ranks' and any C library's too) into the job's log and echoes
the ranks' progress lines; ``deadline`` stops the job after its timeout (SIGALRM, so main thread
only); a failed rank is recorded as ``worker.py`` records it under torchrun, its traceback in
the log.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Iterator, TextIO

from adp_pass.launch import RankFailed, free_port, pump_lines, record_failure, torchrun_command

# After the timeout, how long the job may take to stop before this process exits without it
# (a rank stuck in a C call cannot be interrupted, only killed with its process).
STOP_GRACE_S = 30.0
# torchrun's agent installs handlers for these and leaves them installed.
_AGENT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP",
                                                          "SIGQUIT") if hasattr(signal, name))


class _TimeUp(BaseException):
    """Raised in the main thread when the job's time is up (a BaseException: the rank's own
    ``except Exception`` must not swallow it)."""


def can_run_here() -> bool:
    """The main thread (the deadline is a SIGALRM) of a process with no default process group
    (a one-rank job creates its own)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal,
                                                                                 "setitimer"):
        return False
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def serve_here(job_path: Path, out: Path, world_size: int) -> int:
    """Serve the job from this process; the exit code ``python -m torch.distributed.run`` would
    have (0, or 1 when a rank failed)."""
    threads = os.environ.get("OMP_NUM_THREADS") or "1"
    with _environment(OMP_NUM_THREADS=threads):
        if world_size == 1:
            return _serve_one_rank(job_path, out, int(threads) if threads.isdigit() else 1)
        return _run_agent(job_path, out, world_size)


def _serve_one_rank(job_path: Path, out: Path, threads: int) -> int:
    import torch
    import torch.distributed as dist

    from adp_pass.runtime import worker

    # What torchrun gives a rank: its place in the job and where the job's store is.
    env = dict(RANK="0", LOCAL_RANK="0", GROUP_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # The subprocess ran with OMP_NUM_THREADS threads (1 unless set): the same here.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    if torch.cuda.is_initialized():  # a job ran here before: report this rank's own peak
        torch.cuda.reset_peak_memory_stats(0)
    try:
        with _environment(**env):
            worker.main(str(job_path), str(out))
        return 0
    except (KeyboardInterrupt, _TimeUp):
        raise
    except BaseException as err:  # noqa: BLE001 - as worker.py's __main__ under torchrun
        record_failure(out, 0, err)
        traceback.print_exc()  # into the log, as the rank process printed it
        return 1
    finally:
        torch.set_num_threads(previous_threads)
        if dist.is_initialized():  # the rank failed before its own teardown
            dist.destroy_process_group()
        # The rank's model is held in reference cycles: give its device memory back now, before
        # whatever this process starts next (a benchmark's next mapping, whose ranks are other
        # processes on the same GPUs, ran out of memory beside 70 GB of a finished Qwen3-8B).
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _run_agent(job_path: Path, out: Path, world_size: int) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun's own arguments: the launcher's command line without "python -m <torchrun>".
    command = torchrun_command("adp_pass.runtime.worker", out, world_size)
    args = get_args_parser().parse_args(command[3:])
    handlers = {sig: signal.getsignal(sig) for sig in _AGENT_SIGNALS}
    try:
        # The agent sets this in the environment of the process it runs in: undone after.
        with _environment(TORCHELASTIC_SIGNALS_TO_HANDLE=None):
            run(args)
        return 0
    except ChildFailedError as err:
        print(err.format_msg(), file=sys.stderr)  # torchrun's report, into the log
        return 1
    except SignalException as err:  # the agent stopped its ranks first
        if err.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise SystemExit(128 + int(err.sigval)) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deadline(timeout_s: float, log: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Stop the job when ``timeout_s`` is up: :class:`RankFailed`, as when the torchrun
    subprocess was killed. Should the job not stop within ``STOP_GRACE_S`` more (stuck in a C
    call), ``say`` why and exit the process with code 1."""
    message = f"the job did not finish within {timeout_s:.0f} s"

    def time_up(signum, frame):
        raise _TimeUp

    def give_up():
        say(f"adp: error: {message} and did not stop; exiting (its output: {log})")
        os._exit(1)

    previous = signal.signal(signal.SIGALRM, time_up)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    last_resort = threading.Timer(timeout_s + STOP_GRACE_S, give_up)
    last_resort.daemon = True
    last_resort.start()
    try:
        yield
    except _TimeUp:
        raise RankFailed(message, log=str(log), hint=f"every rank's output is in {log}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        last_resort.cancel()


@contextlib.contextmanager
def output_into(log: Path, echo: bool) -> Iterator[Callable[[str], None]]:
    """For the duration, everything this process and its children print goes into ``log``
    (a file descriptor 1 and 2 redirect, so C libraries and subprocesses too, and
    ``sys.stdout``/``sys.stderr``, which a test harness may have replaced); with ``echo``, the
    ranks' progress lines (``[rank N ...] ...``) also go to the real stderr. Yields a function
    that writes a line to the real stderr."""
    real_stderr, owned = _real_stderr()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    read_end, write_end = os.pipe()
    pump = threading.Thread(target=_pump, args=(read_end, log, real_stderr if echo else None),
                            name="adp-job-log", daemon=True)
    pump.start()
    streams = sys.stdout, sys.stderr
    try:
        for fd in (1, 2):
            os.dup2(write_end, fd)
        os.close(write_end)
        # Line-buffered like the rank's own process; never closed, since a logger made during
        # the job keeps its stream, which after the job writes to the real fd 1 or 2 again.
        sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False,
                                       errors="backslashreplace") for fd in (1, 2))

        def say(line: str) -> None:
            print(line, file=real_stderr, flush=True)

        yield say
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = streams
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        # The pipe ends when its last writer is gone; a rank process that outlives the job
        # (it should not) keeps it open: do not wait for it long.
        pump.join(timeout=10)
        if owned:
            real_stderr.close()


def _real_stderr() -> tuple[TextIO, bool]:
    """Where the echo goes: ``sys.stderr`` itself unless it writes to file descriptor 2, which
    is about to point into the log (then a stream of its own on a copy of that descriptor)."""
    try:
        to_fd_2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a harness's in-memory stream
        to_fd_2 = False
    if not to_fd_2:
        return sys.stderr, False
    return open(os.dup(2), "w", buffering=1, errors="backslashreplace"), True


def _pump(read_end: int, log: Path, echo_to: TextIO | None) -> None:
    with open(read_end, errors="replace") as source, log.open("w") as sink:
        pump_lines(source, sink, echo_to)


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Set (None: remove) environment variables for the duration; restore them after."""
    before = {name: os.environ.get(name) for name in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(before)


def _set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
