"""``run_job`` starts no ``torchrun`` interpreter of its own (runtime/in_process.py): a one-rank
job runs its rank in the calling process, a larger one torchrun's agent there. The tokens, the
log, the errors and the timeout are those of the torchrun subprocess (``torchrun=True``,
``adp run --torchrun``)."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from adp_pass import cli
from adp_pass.launch import RankFailed
from adp_pass.runtime import frontend, in_process, rank, worker
from adp_pass.runtime.frontend import make_job, run_job, synthetic_requests
from adp_pass.runtime.contract import Job
from adp_pass.runtime.sampling import SamplingParams
from adp_pass.runtime.weights import CheckpointError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One build cache for the module: the tiny preset is built once, by the first job (in
    this process: no imports to wait for), and loaded by the others."""
    return tmp_path_factory.mktemp("build-cache")


def _tokens(stdout: str) -> list[tuple[str, str]]:
    return re.findall(r"rank 0 (req-\d+): (\[[\d, ]*\])", stdout)


@pytest.mark.slow
def test_the_rank_runs_here_and_leaves_the_process_as_it_was(tmp_path, cache_dir, capfd,
                                                             monkeypatch):
    def no_torchrun(*args, **kwargs):
        raise AssertionError("run_job started torchrun")

    ran_in: list[int] = []

    def main_here(*args):
        ran_in.append(os.getpid())
        return serve(*args)

    serve = worker.main
    monkeypatch.setattr(frontend, "run_logged", no_torchrun)
    monkeypatch.setattr(in_process, "_run_agent", no_torchrun)
    monkeypatch.setattr(worker, "main", main_here)
    params = SamplingParams(max_new_tokens=2)
    job = make_job("tp=1,attn_dp=1", [synthetic_requests(1, 5, params, 256)], preset="tiny",
                   cache_dir=str(cache_dir))
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGALRM)
    report = run_job(job, 1, log_path=tmp_path / "run.log")
    assert len(report.results[0].tokens) == 2 and ran_in == [os.getpid()]
    out, err = capfd.readouterr()
    log = (tmp_path / "run.log").read_text()
    assert "served 1 requests" in log and "served 1 requests" in err  # echoed from the log
    assert "building the rank's model" in log and out == ""
    # Its environment, threads, process group, alarm and file descriptors are undone.
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ
    assert torch.get_num_threads() == threads and not dist.is_initialized()
    assert signal.getsignal(signal.SIGALRM) == handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    # ... and its model is gone already (it sits in reference cycles): the memory is free for
    # whatever this process starts next, as it would be after a rank process.
    from adp_pass.runtime.engine import RankEngine

    assert not [o for o in gc.get_objects() if isinstance(o, RankEngine)]
    print("after the job")
    assert capfd.readouterr().out == "after the job\n"


@pytest.mark.full  # CI time: a torchrun job and an in-process one; CI runs the in-process rank
# (test_the_rank_runs_here_...) and torchrun jobs elsewhere (tests/test_runtime.py, test_cli.py)
def test_one_rank_in_the_cli_process_gives_the_tokens_of_torchrun(tmp_path, cache_dir):
    args = [sys.executable, "-m", "adp_pass.cli", "run", "--preset", "tiny", "--world-size",
            "1", "--requests", "2", "--prompt-len", "5", "--new-tokens", "4",
            "--cache-dir", str(cache_dir)]
    here = subprocess.run([*args, "--log-dir", str(tmp_path / "here")], capture_output=True,
                          text=True, timeout=300)
    there = subprocess.run([*args, "--torchrun", "--log-dir", str(tmp_path / "torchrun")],
                           capture_output=True, text=True, timeout=300)
    assert here.returncode == 0, here.stderr
    assert there.returncode == 0, there.stderr
    assert "(in this process)" in here.stdout and "(torchrun)" in there.stdout
    assert len(_tokens(here.stdout)) == 2 and _tokens(here.stdout) == _tokens(there.stdout)
    # All of it printed, though the process ends without its interpreter's teardown.
    assert here.stdout.rstrip().splitlines()[-1].startswith("total decode tokens/s:")
    for out, log_dir in ((here, tmp_path / "here"), (there, tmp_path / "torchrun")):
        (log,) = log_dir.glob("run-*.log")
        assert re.search(r"\[rank 0 \+\d+\.\ds\] served 2 requests", log.read_text())
        assert re.search(r"\[rank 0 \+\d+\.\ds\] served 2 requests", out.stderr)


def test_a_failed_rank_in_the_cli_process_is_reported_as_under_torchrun(tmp_path, monkeypatch,
                                                                        capsys):
    def unreadable(*args, **kwargs):
        raise CheckpointError("shard 2 is unreadable", hint="re-download the checkpoint")

    monkeypatch.setattr(rank, "build_rank", unreadable)
    code = cli.main(["run", "--world-size", "1", "--requests", "1", "--log-dir", str(tmp_path)])
    err = capsys.readouterr().err
    (log,) = tmp_path.glob("run-*.log")
    lines = err.strip().splitlines()
    error_at = next(i for i, line in enumerate(lines) if ": error: " in line)
    assert code == 1 and lines[error_at:] == [
        "adp run: error: rank 0 failed: CheckpointError: shard 2 is unreadable",
        "  fix: re-download the checkpoint",
        f"  rank logs: {log}",
    ]
    assert "Traceback" not in err and "Traceback" in log.read_text()


def test_ctrl_c_in_the_rank_interrupts_adp_run(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rank, "build_rank", interrupted)
    code = cli.main(["run", "--world-size", "1", "--requests", "1", "--log-dir", str(tmp_path)])
    assert code == 130 and "adp run: error: interrupted" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_a_rank_past_its_timeout_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(rank, "build_rank", lambda *args, **kwargs: time.sleep(60))
    start = time.monotonic()
    with pytest.raises(RankFailed, match="the job did not finish within 1 s") as caught:
        run_job(Job(mapping="tp=1,attn_dp=1"), 1, timeout_s=1, log_path=tmp_path / "run.log")
    assert time.monotonic() - start < 10
    assert caught.value.log == str(tmp_path / "run.log")
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and not dist.is_initialized()


def _processes_naming(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


@pytest.mark.multirank
def test_torchruns_agent_in_this_process_stops_its_ranks_after_the_timeout(tmp_path):
    """Two ranks still building when the time is up: both are gone when run_job raises."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signals_to_handle = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    job = Job(mapping="tp=2,attn_dp=1", preset="tiny")  # no build cache: seconds of tracing
    with pytest.raises(RankFailed, match="did not finish within 4 s"):
        run_job(job, 2, timeout_s=4, out_dir=str(tmp_path / "job"), log_path=tmp_path / "log")
    assert _processes_naming(str(tmp_path / "job")) == []
    # torchrun's agent installs its own signal handlers; Ctrl-C is a KeyboardInterrupt again.
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE") == signals_to_handle


@pytest.mark.multirank
def test_a_failed_rank_under_the_agent_here_is_named_and_its_peer_stopped(tmp_path):
    with pytest.raises(RankFailed, match=r"^rank [01] failed: UnknownPreset: unknown preset "
                                         r"'no-such-preset'") as caught:
        run_job(Job(mapping="tp=2,attn_dp=1", preset="no-such-preset"), 2, timeout_s=60,
                out_dir=str(tmp_path / "job"), log_path=tmp_path / "log")
    assert caught.value.log == str(tmp_path / "log")
    assert "Traceback" in (tmp_path / "log").read_text()  # the ranks' and torchrun's reports
    assert _processes_naming(str(tmp_path / "job")) == []
