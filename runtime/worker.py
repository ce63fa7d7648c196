"""One rank of a serving job, started by torchrun: ``python -m torch.distributed.run
--nproc-per-node N -m adp_pass.runtime.worker JOB.json OUT_DIR`` (or its agent run in the front
end's process); the one rank of a one-rank job runs in the front end's process itself, with
torchrun's environment variables (``runtime/in_process.py``).

The rank builds its own model first (tracing its graph on a fake group needs no peer), then
joins the job's process group, creates the groups the mapping needs and binds them into its
graph (``runtime/groups.py``). Under attention-DP with a replicated MLP nothing is exchanged
while it serves its requests; when the graph holds collectives (a sharded MLP, attention TP, the
plain TP job) the ranks of a lockstep group step together (``runtime/lockstep.py``).

A rank serves its DP group's requests (``job.assignments[mapping.dp_rank(rank)]``); the ranks
of one attention group serve the same requests with the same sampling seed, and only the
group's first rank (its *leader*) counts in the job's totals.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from adp_pass.launch import init_rank, rank_device
from adp_pass.mapping import Mapping
from adp_pass.quick_exit import exit_without_teardown
from adp_pass.runtime.job import Job


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


def main(job_path: str, out_dir: str) -> None:
    job = Job.read(job_path)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device()
    config = job.config()
    log = rank_logger(rank)

    from adp_pass.runtime.engine import RankEngine
    from adp_pass.runtime.groups import bind_groups, create_groups
    from adp_pass.runtime.lockstep import Lockstep

    mapping = Mapping.load(job.mapping)
    dp_rank = mapping.dp_rank(rank)
    leader = mapping.attn_group(rank)[0] == rank
    built = build_rank(job, config, mapping, rank, device, log)

    init_rank()
    groups = create_groups(mapping)
    # Before the model runs (and before CUDA graphs are captured): the graph's collectives
    # must name this job's groups, not the fake ones it was traced on.
    collectives = bind_groups(built.model, groups.names)
    lockstep = Lockstep(groups.lockstep) if mapping.lockstep_size > 1 else None
    if lockstep is not None:
        log(f"{collectives} collectives; stepping with ranks {groups.lockstep_ranks}")
    log("joined the job's process group")
    # Seeded per DP group: the ranks of one attention group sample the same tokens.
    mark = time.perf_counter()
    engine = RankEngine(
        built.model, built.cache, max_batch=job.max_batch, max_position=job.max_position,
        max_seq_len=job.max_seq_len, cuda_graph_sizes=tuple(job.cuda_graph_sizes) or None,
        seed=job.seed + dp_rank, lockstep=lockstep,
    )
    if engine._graphs is not None:
        log(f"decode CUDA graphs for batch {list(job.cuda_graph_sizes)} captured in "
            f"{time.perf_counter() - mark:.1f} s")
    requests = job.requests_for(dp_rank)
    check = None
    if job.check_first_step:
        check = _first_step_check(built, config, requests, device, engine)

    dist.barrier()  # start together, so per-rank throughput is measured over the same window
    start = time.perf_counter()
    results = _serve(engine, requests, log)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    log(f"served {len(results)} requests in {wall:.2f} s")
    stats = engine.stats
    record = {
        "rank": rank,
        "world_size": world_size,
        "mapping": str(mapping),
        "dp_rank": dp_rank,
        "leader": leader,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "requests": len(requests),
        "wall_s": wall,
        "prefill_tokens": stats.prefill_tokens,
        "prefill_s": stats.prefill_s,
        "decode_steps": stats.decode_steps,
        "decode_tokens": stats.decode_tokens,
        "decode_s": stats.decode_s,
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "mean_decode_step_ms": stats.mean_decode_step_ms,
        "mean_ttft_ms": stats.mean_ttft_ms,
        "memory_allocated_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                 if device.type == "cuda" else None),
        "idle_calls": stats.idle_calls,
        "idle_s": stats.idle_s,
        "agree_s": stats.agree_s,
        "timings": built.timings,
        "counts": built.counts,
        "first_step_check": check,
        "results": [
            {"request_id": r.request_id, "tokens": r.tokens, "finish_reason": r.finish_reason}
            for r in results
        ],
    }
    record["phases"] = [_phase_stats(stats, wall, len(requests))]
    for phase in range(1, 1 + len(job.later_phases)):
        engine.stats = type(stats)()
        later = job.requests_for(dp_rank, phase)
        dist.barrier()
        start = time.perf_counter()
        _serve(engine, later, log)
        if device.type == "cuda":
            torch.cuda.synchronize()
        record["phases"].append(_phase_stats(engine.stats, time.perf_counter() - start,
                                             len(later)))
        log(f"workload {phase + 1}: {len(later)} requests, "
            f"{engine.stats.mean_decode_step_ms:.2f} ms per decode step")
    if device.type == "cuda":
        record["memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    log("record written; waiting for the other ranks")
    dist.barrier()
    if device.type == "cuda" and mapping.lockstep_size > 1:
        # NCCL's communicators are captured inside the decode CUDA graphs: tearing the group
        # down while those graphs live can block forever. The record is written and every
        # rank is past the barrier, so this rank's work is done: leave without the teardown.
        log("done")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


def _phase_stats(stats, wall: float, requests: int) -> dict:
    return {"requests": requests, "wall_s": wall, "decode_steps": stats.decode_steps,
            "decode_tokens": stats.decode_tokens, "decode_s": stats.decode_s,
            "mean_decode_step_ms": stats.mean_decode_step_ms,
            "decode_tokens_per_s": stats.decode_tokens_per_s, "mean_ttft_ms": stats.mean_ttft_ms,
            "prefill_tokens": stats.prefill_tokens, "prefill_s": stats.prefill_s,
            "idle_calls": stats.idle_calls}


def _serve(engine, requests: list, log) -> list:
    """``engine.generate`` with a progress line per quarter of the requests. With lockstep
    the loop runs until no rank of the group has work, not just this one."""
    for request in requests:
        engine.add(request)
    engine.begin()
    results, shown, every = [], 0, max(1, len(requests) // 4)
    while engine.active:
        results += engine.step()
        if len(results) - shown >= every:
            shown = len(results)
            log(f"served {shown}/{len(requests)} requests")
    order = {r.request_id: i for i, r in enumerate(requests)}
    return sorted(results, key=lambda r: order[r.request_id])


def _record_failure(out_dir: str, err: BaseException) -> None:
    """Leave this rank's own error where the front end looks for it (torchrun reports only an
    exit code for a ``-m`` module)."""
    rank = int(os.environ.get("RANK", 0))
    record = {"rank": rank, "type": type(err).__name__, "message": str(err).strip(),
              "hint": getattr(err, "hint", None), "time": time.time()}
    with contextlib.suppress(OSError):
        Path(out_dir, f"rank{rank}.error.json").write_text(json.dumps(record))


def _first_step_check(built, config, requests: list, device: torch.device, engine) -> dict | None:
    """Prefill logits of one prompt against transformers' Qwen3 holding the same tensors.

    Collective: every rank calls it, with or without requests. Sharded weights (a sharded MLP,
    attention TP, the plain TP job) are gathered from the peers for the reference, and the
    model call goes through ``engine.prefill_logits``, padded to the lockstep group's shape."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config).eval()
    weights, skipped = _full_weights(built.model, reference)
    got = engine.prefill_logits(requests[0].prompt if requests else None)
    if not requests or weights is None:
        del reference
        return {"skipped": skipped} if requests else None
    reference.load_state_dict(weights, strict=False, assign=True)  # shares the rank's tensors
    with torch.device(device):  # inv_freq is not in the state dict: build it for real
        reference.model.rotary_emb = type(reference.model.rotary_emb)(config)
    prompt = torch.tensor([requests[0].prompt], device=device)
    with torch.no_grad():
        want = reference(input_ids=prompt, use_cache=False).logits[0, -1].float()
        got = got.float()
        # The same weights in fp32: how far either bf16 path is from exact arithmetic.
        exact = reference.float()(input_ids=prompt, use_cache=False).logits[0, -1]
    del reference
    return {
        "max_abs_diff": (got - want).abs().max().item(),
        "max_abs_logit": want.abs().max().item(),
        "same_argmax": bool(got.argmax() == want.argmax()),
        "ours_vs_fp32": (got - exact).abs().max().item(),
        "transformers_vs_fp32": (want - exact).abs().max().item(),
    }


def _full_weights(model, reference) -> tuple[dict | None, str | None]:
    """The rank's weights at the reference's full shapes: its own tensors where they are full,
    else the shards of the ``full // local`` consecutive ranks around it, all-gathered over the
    world and concatenated along the one sharded dim (shards are contiguous, in rank order).

    Collective when a weight is sharded; every rank holds the same names and shapes, so all of
    them gather the same tensors in the same order (or all skip)."""
    from adp_pass.runtime.lower.fuse_projections import unfused_state_dict

    full = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    weights = {k: v for k, v in unfused_state_dict(model).items() if not k.startswith("kv_cache")}
    for name, tensor in weights.items():
        want = full.get(name)
        if want is None or tuple(tensor.shape) == want:
            continue
        dims = [d for d, (a, b) in enumerate(zip(tensor.shape, want)) if a != b]
        if len(tensor.shape) != len(want) or len(dims) != 1 or want[dims[0]] % tensor.shape[dims[0]]:
            return None, f"{name} is {list(tensor.shape)}, not a shard of {list(want)}"
        dim, parts = dims[0], want[dims[0]] // tensor.shape[dims[0]]
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, tensor.contiguous())
        first = dist.get_rank() // parts * parts
        weights[name] = torch.cat(pieces[first:first + parts], dim=dim)
    return weights, None


def build_rank(job: Job, config, mapping: Mapping, rank: int, device: torch.device, log):
    """The rank's model as the job says (checkpoint or seeded weights, KV cache, build cache,
    graph dumps), each stage logged as it ends."""
    from adp_pass.runtime.prepare import prepare_rank

    log(f"building the rank's model on {device} ({job.dtype})")
    built = prepare_rank(
        config, mapping, rank, device=device, dtype=job.torch_dtype,
        checkpoint=job.checkpoint, num_blocks=job.num_blocks, block_size=job.block_size,
        max_position=job.max_position, seed=job.seed, cache_dir=job.cache_dir,
        dump_dir=f"{job.dump_dir}/rank{rank}" if job.dump_dir is not None else None,
        progress=log,
    )
    log(f"model ready: {built.counts} in {sum(built.timings.values()):.1f} s; {built.describe()}")
    return built


def rank_logger(rank: int):
    def log(message: str) -> None:
        elapsed = time.perf_counter() - _PROCESS_START
        print(f"[rank {rank} +{elapsed:.1f}s] {message}", file=sys.stderr, flush=True)

    return log


if __name__ == "__main__":
    try:
        main(*sys.argv[1:3])
    except BaseException as err:  # noqa: BLE001 - recorded, then re-raised for the log
        _record_failure(sys.argv[2], err)
        raise
    # The record is written and the group torn down: torchrun need not wait for the teardown.
    exit_without_teardown(0)
