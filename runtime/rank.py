"""One rank's start-up, the same for every worker loop (batch job, serve link): the job's mapping
(parsed once, by the front end) → this rank's device → its model built through the pipeline
(``runtime/prepare.py``) → the job's process group joined and its groups bound into the graph →
the lockstep and the engine. :meth:`RankSession.close` ends it, NCCL included.

The rank builds its model before it joins the group: tracing its graph on a fake group needs
no peer, so a slow build never holds the others in a collective. Under attention-DP with a
replicated MLP nothing is exchanged while the rank serves; when the graph holds collectives
(a sharded MLP, attention TP, the plain TP job) the ranks of a lockstep group step together
(``runtime/lockstep.py``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from adp_pass.launch import init_rank, rank_device
from adp_pass.mapping import Mapping
from adp_pass.runtime.contract import Job
from adp_pass.runtime.engine import RankEngine
from adp_pass.runtime.prepare import RankModel, prepare_rank

Log = Callable[[str], None]


def _process_start() -> float:
    """``time.perf_counter()`` at this process's start: read from /proc on Linux (the kernel
    counts in clock ticks since boot), else now. Under torchrun the rank is the process; a
    one-rank job runs in the caller's process (``adp run``), whose start is the user's too."""
    now = time.perf_counter()
    try:
        # Fields after the parenthesised command name; the start time is field 22 of the line.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return now - max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return now


# The log's "+s" clock, so a start-up reads as a timeline (imports, build, group, CUDA graphs,
# first token).
_PROCESS_START = _process_start()


def rank_logger(rank: int) -> Log:
    def log(message: str) -> None:
        elapsed = time.perf_counter() - _PROCESS_START
        print(f"[rank {rank} +{elapsed:.1f}s] {message}", file=sys.stderr, flush=True)

    return log


@dataclass
class RankSession:
    """A started rank: its place in the job, its built model, its engine."""

    job: Job
    rank: int
    device: torch.device
    built: RankModel
    engine: RankEngine
    log: Log
    joined: bool  # member of the job's process group (a replicated serving rank is not)
    lockstep_group: object | None = None  # the process group it steps with, if any
    lockstep_leader: int = 0  # that group's first rank (reads the serve link for the group)
    # The mapping rank of the process group's rank 0: 0, or the group's first rank when the job
    # is one lockstep group of a serving mapping (each restarts alone, docs/serving.md).
    first_rank: int = 0

    @property
    def mapping(self) -> Mapping:
        return self.job.mapping

    @property
    def dp_rank(self) -> int:
        return self.mapping.dp_rank(self.rank)

    @property
    def leader(self) -> bool:
        """The first rank of its attention group: its DP group's tokens are reported once."""
        return self.mapping.attn_group(self.rank)[0] == self.rank

    def barrier(self) -> None:
        if self.joined:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the job's process group. With NCCL communicators captured inside the decode
        CUDA graphs, tearing the group down while those graphs live can block forever: such a
        rank, its work done and past the caller's last barrier, exits without the teardown."""
        if not self.joined:
            return
        import torch.distributed as dist

        if self.device.type == "cuda" and self.mapping.lockstep_size > 1:
            self.log("done")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()


def start_rank(job: Job, rank: int, *, join: bool = True, log: Log | None = None,
               first_rank: int = 0) -> RankSession:
    """Build rank ``rank`` of ``job`` and make its engine. ``join``: join the job's process
    group (torchrun's environment) and bind its groups; False only for a rank whose graph holds
    no collective and which serves alone (a replicated serving rank: no peer can take it down).
    ``first_rank``: the process group holds only the lockstep group starting at this mapping
    rank (``adp serve`` starts each lockstep group as its own job, so that it fails and restarts
    alone); 0 with the whole job in one group.
    """
    log = log or rank_logger(rank)
    mapping = job.mapping
    device = rank_device()
    built = build_rank(job, rank, device, log)
    joined = JoinedGroups(None, None, rank)
    if join:
        joined = join_groups(mapping, built.model, rank, log, first_rank=first_rank)
    elif mapping.lockstep_size > 1:
        raise ValueError(f"mapping {mapping} keeps collectives: its ranks must join the group")
    serving = job.serving
    mark = time.perf_counter()
    engine = RankEngine(
        built.model, built.cache, max_batch=serving.max_batch, max_position=serving.max_position,
        max_seq_len=serving.max_seq_len, cuda_graph_sizes=tuple(serving.cuda_graph_sizes) or None,
        # Seeded per DP group: the ranks of one attention group sample the same tokens.
        seed=job.seed + mapping.dp_rank(rank), lockstep=joined.lockstep,
    )
    if serving.cuda_graph_sizes and device.type == "cuda":
        log(f"decode CUDA graphs for batch {list(serving.cuda_graph_sizes)} captured in "
            f"{time.perf_counter() - mark:.1f} s")
    return RankSession(job, rank, device, built, engine, log, join, joined.lockstep_group,
                       joined.lockstep_leader, first_rank)


@dataclass
class JoinedGroups:
    lockstep: object | None  # runtime.lockstep.Lockstep, for a graph that holds collectives
    lockstep_group: object | None
    lockstep_leader: int


def join_groups(mapping: Mapping, model: torch.nn.Module, rank: int,
                log: Log | None = None, first_rank: int = 0) -> JoinedGroups:
    """Join the job's process group (torchrun's environment; a no-op if joined), create the
    groups ``mapping`` needs and bind them into ``model``'s collectives, before the model runs
    (and before CUDA graphs are captured): the graph must name this job's groups, not the fake
    ones it was traced on."""
    from adp_pass.runtime.groups import bind_groups, create_groups
    from adp_pass.runtime.lockstep import Lockstep

    import torch.distributed as dist

    init_rank()
    local = mapping
    if dist.get_world_size() < mapping.world_size:
        # One lockstep group as a job of its own: every collective of its graph stays inside
        # the group, so the same attention / MLP blocks laid over the group's ranks alone are
        # the groups it needs (rank r of this job is mapping rank first_rank + r).
        if dist.get_world_size() != mapping.lockstep_size or first_rank % mapping.lockstep_size:
            raise ValueError(f"a job of {dist.get_world_size()} ranks from rank {first_rank} is "
                             f"not a lockstep group of mapping {mapping}")
        local = Mapping(tp_size=mapping.lockstep_size,
                        enable_attention_dp=mapping.enable_attention_dp,
                        attn_tp_size=mapping.attn_tp_size, mlp_tp_size=mapping.mlp_tp_size)
    groups = create_groups(local)
    collectives = bind_groups(model, groups.names)
    joined = JoinedGroups(None, None, rank)
    if mapping.lockstep_size > 1:
        joined = JoinedGroups(Lockstep(groups.lockstep), groups.lockstep,
                              first_rank + groups.lockstep_ranks[0])
        if log is not None:
            log(f"{collectives} collectives; stepping with ranks "
                f"{[first_rank + r for r in groups.lockstep_ranks]}")
    if log is not None:
        log("joined the job's process group")
    return joined


def build_rank(job: Job, rank: int, device: torch.device, log: Log) -> RankModel:
    """The rank's model as the job says (checkpoint or seeded weights, KV cache, build cache,
    graph dumps), each stage logged as it ends."""
    log(f"building the rank's model on {device} ({job.dtype})")
    serving = job.serving
    built = prepare_rank(
        job.model_config(), job.mapping, rank, device=device, dtype=getattr(torch, job.dtype),
        checkpoint=job.checkpoint, num_blocks=serving.num_blocks,
        block_size=serving.block_size, max_position=serving.max_position, seed=job.seed,
        serving=serving,  # the KV cache's dtype and scale
        cache_dir=job.cache_dir,
        dump_dir=f"{job.dump_dir}/rank{rank}" if job.dump_dir is not None else None,
        progress=log,
    )
    log(f"model ready: {built.counts} in {sum(built.timings.values()):.1f} s; {built.describe()}")
    return built
