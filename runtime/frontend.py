"""Front end: spread requests over the DP groups by load, start the ranks (torchrun's agent, or a
one-rank job's rank itself, in this process), collect what each served.

Load is tokens in flight (prompt + tokens still to generate): each request goes to the DP group
that has the fewest, so long and short requests even out across groups. A DP group is one rank
under pure attention-DP (``tp=N,attn_dp=1``); the ranks of an attention group (``attn_tp``, or
the whole job for ``attn_dp=0``) serve the same requests, and only its first rank, the leader,
counts in the totals.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adp_pass.launch import RankFailed
from adp_pass.runtime.engine import Request
from adp_pass.runtime.job import Job, request_dict
from adp_pass.runtime.sampling import SamplingParams


def assign_by_load(requests: list[Request], dp_size: int) -> list[list[Request]]:
    """Each request to the DP group (``Mapping.dp_size`` of them) with the fewest tokens in
    flight (ties: lowest group)."""
    load = [0] * dp_size
    assigned: list[list[Request]] = [[] for _ in range(dp_size)]
    for request in requests:
        rank = min(range(dp_size), key=lambda r: (load[r], r))
        assigned[rank].append(request)
        load[rank] += len(request.prompt) + request.params.max_new_tokens
    return assigned


def synthetic_requests(
    count: int, prompt_len: int, params: SamplingParams, vocab_size: int, seed: int = 0
) -> list[Request]:
    """Random prompts (seeded), all with the same sampling parameters."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab_size, (count, prompt_len), generator=generator)
    return [Request(f"req-{i}", prompts[i].tolist(), params) for i in range(count)]


@dataclass
class JobReport:
    ranks: list[dict]
    log: str | None = None  # every rank's output

    @property
    def leaders(self) -> list[dict]:
        """One record per DP group: its first rank's (the others served the same requests)."""
        return [r for r in self.ranks if r.get("leader", True)]

    @property
    def results(self) -> list[dict]:
        """Every request's result, once (from the leaders)."""
        return [result for r in self.leaders for result in r["results"]]

    @property
    def total_decode_tokens_per_s(self) -> float:
        return sum(r["decode_tokens_per_s"] for r in self.leaders)

    def __str__(self) -> str:
        lines = [f"{'rank':>4} {'dp':>3} {'device':<24} {'requests':>8} {'decode tok/s':>13} "
                 f"{'step ms':>8} {'wall s':>7}"]
        for r in self.ranks:
            dp = f"{r.get('dp_rank', r['rank'])}{'' if r.get('leader', True) else '*'}"
            lines.append(
                f"{r['rank']:>4} {dp:>3} {r['device'][:24]:<24} {r['requests']:>8} "
                f"{r['decode_tokens_per_s']:>13.1f} {r['mean_decode_step_ms']:>8.2f} "
                f"{r['wall_s']:>7.2f}"
            )
        total = f"total decode tokens/s: {self.total_decode_tokens_per_s:.1f}"
        if len(self.leaders) < len(self.ranks):
            groups = len(self.leaders)
            total += (f" (over {groups} DP group{'s' * (groups != 1)}; * serves its group's "
                      "requests again)")
        lines.append(total)
        return "\n".join(lines)


def default_log_path(kind: str = "run", suffix: str = ".log") -> Path:
    """Where a job's rank logs go unless told: one file (or, with ``suffix=""``, directory) per
    job under the temp dir."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "adp-logs" / f"{kind}-{stamp}-{os.getpid()}{suffix}"


def run_job(job: Job, world_size: int, *, timeout_s: float = 1800, out_dir: str | None = None,
            log_path: str | Path | None = None, echo: bool = True,
            torchrun: bool = False) -> JobReport:
    """Start ``world_size`` ranks on this host and return their records.

    A one-rank job runs its rank in this process, a larger one torchrun's agent in this process
    (its ranks in processes of their own): no ``torchrun`` interpreter between the caller and
    the ranks (``runtime/in_process.py``). With ``torchrun``, or off the main thread, or where
    this process already has a process group, a ``torchrun`` subprocess starts them instead.

    Either way, everything torchrun and the ranks print goes to ``log_path`` (kept, success or
    not); with ``echo`` the ranks' own progress lines (``[rank N] ...``) are also shown on
    stderr, torchrun's messages are not. A failed rank raises :class:`RankFailed` with that
    rank's own error message; a job still running after ``timeout_s`` is stopped and raises it
    too. The job directory (job file, rank records) is temporary unless ``out_dir`` is given.
    """
    from adp_pass.runtime import in_process

    log = Path(log_path) if log_path is not None else default_log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adp-job-")))
        else:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
        job_path = out / "job.json"
        job.write(job_path)
        if torchrun or not in_process.can_run_here():
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={world_size}", "-m", "adp_pass.runtime.worker",
                str(job_path), str(out),
            ]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            returncode = _run_logged(command, env, log, timeout_s, echo)
        else:
            with in_process.output_into(log, echo) as say, \
                    in_process.deadline(timeout_s, log, say):
                returncode = in_process.serve_here(job_path, out, world_size)
        if returncode != 0:
            raise _rank_failure(out, returncode, log)
        report = JobReport([json.loads((out / f"rank{r}.json").read_text())
                            for r in range(world_size)])
    report.log = str(log)
    return report


def _run_logged(command: list[str], env: dict, log: Path, timeout_s: float, echo: bool) -> int:
    """Run ``command`` with its output into ``log``; show rank progress lines; kill the whole
    process group (torchrun and its ranks) on timeout."""
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        timer = threading.Timer(timeout_s, _kill_group, [process])
        timer.start()
        try:
            for line in process.stdout:
                sink.write(line)
                if echo and line.startswith("[rank "):
                    print(line, end="", file=sys.stderr, flush=True)
            returncode = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:  # interrupted: take the ranks down with us
                _kill_group(process, timed_out=False)
    if getattr(process, "timed_out", False):
        raise RankFailed(f"the job did not finish within {timeout_s:.0f} s", log=str(log),
                         hint=f"every rank's output is in {log}")
    return returncode


def _kill_group(process: subprocess.Popen, timed_out: bool = True) -> None:
    process.timed_out = timed_out
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _rank_failure(out: Path, returncode: int, log: Path) -> RankFailed:
    """The first rank's own error (ranks record theirs in ``rank{N}.error.json``)."""
    records = [json.loads(p.read_text()) for p in out.glob("rank*.error.json")]
    if not records:
        return RankFailed(
            f"the job's ranks exited (code {returncode}) without an error message: killed, or "
            "out of memory?", log=str(log), hint=f"every rank's output is in {log}")
    first = min(records, key=lambda r: r["time"])
    return RankFailed(f"rank {first['rank']} failed: {first['type']}: {first['message']}",
                      rank=first["rank"], log=str(log), hint=first.get("hint"))


def make_job(mapping: str, assignments: list[list[Request]], **settings) -> Job:
    """A job serving ``assignments[g]`` on DP group ``g`` (at most ``dp_size`` lists)."""
    from adp_pass.mapping import Mapping

    dp_size = Mapping.load(mapping).dp_size
    if len(assignments) > dp_size:
        raise ValueError(f"{len(assignments)} request lists for mapping {mapping!r}, which has "
                         f"{dp_size} DP groups: spread them with assign_by_load(requests, "
                         f"{dp_size})")
    return Job(mapping=mapping, assignments=[[request_dict(r) for r in rank] for rank in assignments],
               **settings)
