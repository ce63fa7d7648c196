"""One rank of a batch job (``adp run``, the benches), started by the launcher
(``adp_pass/launch.py``): ``python -m torch.distributed.run --nproc-per-node N -m
adp_pass.runtime.worker JOB.json OUT_DIR``, torchrun's agent in the front end's process, or the
one rank of a one-rank job in that process itself.

The rank starts (``runtime/rank.py``), serves its DP group's requests of each workload
(``Job.workloads``), and writes its :class:`~adp_pass.runtime.contract.RankRecord` to
``OUT_DIR/rank<r>.json``; the ranks of one attention group serve the same requests with the
same sampling seed, and only the group's first rank (its *leader*) counts in the job's totals.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from adp_pass.launch import record_failure
from adp_pass.quick_exit import exit_without_teardown
from adp_pass.runtime.contract import (
    Job, PhaseStats, RankRecord, Request, Result, record_path, to_json)
from adp_pass.runtime.rank import RankSession, start_rank


def main(job_path: str, out_dir: str) -> None:
    job = Job.read(job_path)
    session = start_rank(job, int(os.environ["RANK"]))
    check = None
    if job.check_first_step:
        from adp_pass.runtime.first_step import first_step_check

        check = first_step_check(session, job.requests_for(session.dp_rank))
    phases, results = [], []
    for workload in range(max(1, len(job.workloads))):
        requests = job.requests_for(session.dp_rank, workload)
        if workload:
            session.engine.stats = type(session.engine.stats)()
        # Start together, so per-rank throughput is measured over the same window.
        session.barrier()
        start = time.perf_counter()
        served = _serve(session, requests)
        if session.device.type == "cuda":
            torch.cuda.synchronize()
        phases.append(PhaseStats.of(session.engine.stats, len(requests),
                                    time.perf_counter() - start))
        session.log(f"served {len(served)} requests in {phases[-1].wall_s:.2f} s"
                    + (f" (workload {workload + 1}), {phases[-1].mean_decode_step_ms:.2f} ms per "
                       "decode step" if workload else ""))
        results = results or served  # the first workload's tokens are the job's answer
    record = RankRecord(
        rank=session.rank, world_size=job.mapping.world_size, mapping=job.mapping,
        dp_rank=session.dp_rank, leader=session.leader, device=_device_name(session.device),
        phases=phases, results=results, timings=session.built.timings,
        counts=session.built.counts, first_step_check=check,
        memory_allocated_gib=(torch.cuda.max_memory_allocated(session.device) / 2**30
                              if session.device.type == "cuda" else None),
    )
    record_path(out_dir, session.rank).write_text(json.dumps(to_json(record)))
    session.log("record written; waiting for the other ranks")
    session.barrier()
    session.close()


def _serve(session: RankSession, requests: list[Request]) -> list[Result]:
    """The requests served to the end, with a progress line per quarter of them. With lockstep
    the loop runs until no rank of the group has work, not just this one."""
    engine = session.engine
    for request in requests:
        engine.add(request)
    engine.begin()
    results: list[Result] = []
    shown, every = 0, max(1, len(requests) // 4)
    while engine.active:
        results += engine.step()
        if len(results) - shown >= every:
            shown = len(results)
            session.log(f"served {shown}/{len(requests)} requests")
    order = {r.request_id: i for i, r in enumerate(requests)}
    return [Result(r.request_id, r.prompt_len, list(r.tokens), r.finish_reason)
            for r in sorted(results, key=lambda r: order[r.request_id])]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    try:
        main(*sys.argv[1:3])
    except BaseException as err:  # noqa: BLE001 - recorded, then re-raised for the log
        record_failure(sys.argv[2], int(os.environ.get("RANK", 0)), err)
        raise
    # The record is written and the group torn down: torchrun need not wait for the teardown.
    exit_without_teardown(0)
