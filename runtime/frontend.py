"""Front end: spread requests over the DP ranks by load, start the ranks with torchrun,
collect what each served.

Load is tokens in flight (prompt + tokens still to generate): each request goes to the rank
that has the fewest, so long and short requests even out across ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from adp_pass.runtime.engine import Request
from adp_pass.runtime.job import Job, request_dict
from adp_pass.runtime.sampling import SamplingParams


def assign_by_load(requests: list[Request], dp_size: int) -> list[list[Request]]:
    """Each request to the rank with the fewest tokens in flight (ties: lowest rank)."""
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

    @property
    def total_decode_tokens_per_s(self) -> float:
        return sum(r["decode_tokens_per_s"] for r in self.ranks)

    def __str__(self) -> str:
        lines = [f"{'rank':>4} {'device':<24} {'requests':>8} {'decode tok/s':>13} "
                 f"{'step ms':>8} {'wall s':>7}"]
        for r in self.ranks:
            lines.append(
                f"{r['rank']:>4} {r['device'][:24]:<24} {r['requests']:>8} "
                f"{r['decode_tokens_per_s']:>13.1f} {r['mean_decode_step_ms']:>8.2f} "
                f"{r['wall_s']:>7.2f}"
            )
        lines.append(f"total decode tokens/s: {self.total_decode_tokens_per_s:.1f}")
        return "\n".join(lines)


def run_job(job: Job, world_size: int, *, timeout_s: float = 1800, out_dir: str | None = None
            ) -> JobReport:
    """Start ``world_size`` ranks with torchrun on this host and return their records."""
    out = Path(out_dir or tempfile.mkdtemp(prefix="adp-job-"))
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / "job.json"
    job.write(job_path)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={world_size}", "-m", "adp_pass.runtime.worker",
        str(job_path), str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        done = subprocess.run(command, env=env, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"the job did not finish within {timeout_s:.0f} s") from err
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return JobReport([json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)])


def make_job(mapping: str, assignments: list[list[Request]], **settings) -> Job:
    return Job(mapping=mapping, assignments=[[request_dict(r) for r in rank] for rank in assignments],
               **settings)
