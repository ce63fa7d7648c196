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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from adp_pass.launch import (default_log_path, job_failure, rank_environment, run_logged,
                             torchrun_command)
from adp_pass.mapping import Mapping
from adp_pass.runtime.contract import (
    ContractError, Job, RankRecord, Request, Result, SamplingParams, from_json, record_path)


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
    ranks: list[RankRecord]
    log: str | None = None  # every rank's output

    @property
    def leaders(self) -> list[RankRecord]:
        """One record per DP group: its first rank's (the others served the same requests)."""
        return [r for r in self.ranks if r.leader]

    @property
    def results(self) -> list[Result]:
        """Every request's result, once (from the leaders)."""
        return [result for r in self.leaders for result in r.results]

    @property
    def total_decode_tokens_per_s(self) -> float:
        return sum(r.first.decode_tokens_per_s for r in self.leaders)

    def __str__(self) -> str:
        lines = [f"{'rank':>4} {'dp':>3} {'device':<24} {'requests':>8} {'decode tok/s':>13} "
                 f"{'step ms':>8} {'wall s':>7}"]
        for r in self.ranks:
            dp = f"{r.dp_rank}{'' if r.leader else '*'}"
            lines.append(
                f"{r.rank:>4} {dp:>3} {r.device[:24]:<24} {r.first.requests:>8} "
                f"{r.first.decode_tokens_per_s:>13.1f} {r.first.mean_decode_step_ms:>8.2f} "
                f"{r.first.wall_s:>7.2f}"
            )
        total = f"total decode tokens/s: {self.total_decode_tokens_per_s:.1f}"
        if len(self.leaders) < len(self.ranks):
            groups = len(self.leaders)
            total += (f" (over {groups} DP group{'s' * (groups != 1)}; * serves its group's "
                      "requests again)")
        lines.append(total)
        return "\n".join(lines)


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
    if world_size != job.mapping.world_size:
        raise JobInvalid(f"world_size {world_size} is not the mapping's {job.mapping.world_size} "
                         f"ranks ({job.mapping})", hint=f"pass {job.mapping.world_size}")
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
            command = torchrun_command("adp_pass.runtime.worker", out, world_size)
            returncode = run_logged(command, rank_environment(), log, timeout_s, echo)
        else:
            with in_process.output_into(log, echo) as say, \
                    in_process.deadline(timeout_s, log, say):
                returncode = in_process.serve_here(job_path, out, world_size)
        if returncode != 0:
            raise job_failure(out, returncode, log)
        report = JobReport([from_json(RankRecord, json.loads(record_path(out, r).read_text()))
                            for r in range(world_size)])
    report.log = str(log)
    return report


def make_job(mapping: Mapping | str, assignments: list[list[Request]], *,
             workloads: list[list[list[Request]]] = (), **settings) -> Job:
    """A job serving ``assignments[g]`` on DP group ``g`` (at most ``dp_size`` lists), then each
    of ``workloads`` (more such lists, each measured on its own). ``settings``: the other
    :class:`Job` fields.

    Checked here, before any rank starts (a rank would find it only after its build): the model
    (preset or checkpoint) exists and the mapping divides it, and every request fits the
    model's vocabulary and positions and one rank's KV cache. Each problem is a
    :class:`JobInvalid` naming the request."""
    mapping = Mapping.load(mapping)
    for lists in (assignments, *workloads):
        if len(lists) > mapping.dp_size:
            raise JobInvalid(f"{len(lists)} request lists for mapping {mapping}, which has "
                             f"{mapping.dp_size} DP groups",
                             hint=f"spread them with assign_by_load(requests, {mapping.dp_size})")
    job = Job(mapping=mapping, workloads=[list(assignments), *workloads], **settings)
    check_job(job)
    return job


class JobInvalid(ContractError):
    """A job no rank could serve: the model, the mapping or a request does not fit."""


def check_job(job: Job) -> None:
    """The model exists and the mapping divides it; every request fits the vocabulary, the
    positions and one rank's KV cache (see :func:`make_job`)."""
    from adp_pass.checks import check_checkpoint
    from adp_pass.presets import PRESETS, UnknownPreset, preset_depth

    if job.checkpoint is not None:
        if job.layers is not None:
            raise JobInvalid(f"layers={job.layers} cuts a preset's random model; checkpoint "
                             f"{job.checkpoint} is served at the depth its config.json says",
                             hint="drop layers (adp quantize --layers N writes a shallow FP8 "
                             "checkpoint)")
        config = check_checkpoint(Path(job.checkpoint), "checkpoint")
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        inter, vocab = config["intermediate_size"], config["vocab_size"]
        positions = config.get("max_position_embeddings") or job.serving.max_position
    else:
        if job.preset not in PRESETS:
            raise UnknownPreset(f"unknown preset {job.preset!r}; known: {', '.join(PRESETS)}",
                                flag="preset")
        shape = PRESETS[job.preset]
        try:
            preset_depth(job.preset, job.layers)
        except ValueError as err:
            raise JobInvalid(f"layers={job.layers}: {err}",
                             hint=f"give 1 to {shape.num_hidden_layers}, or None for all"
                             ) from None
        heads, kv_heads, inter = (shape.num_attention_heads, shape.num_key_value_heads,
                                  shape.intermediate_size)
        vocab, positions = shape.vocab_size, shape.max_position_embeddings
    job.mapping.check_model(heads, kv_heads, inter)
    serving = job.serving
    positions = min(positions, serving.max_position)
    longest = serving.max_seq_len or positions
    capacity = serving.num_blocks * serving.block_size
    for lists in job.workloads:
        for requests in lists:
            for request in requests:
                _check_request(request, vocab, min(positions, longest), capacity)


def _check_request(request: Request, vocab: int, positions: int, capacity: int) -> None:
    rid = request.request_id
    if not request.prompt:
        raise JobInvalid(f"request {rid!r} has an empty prompt", hint="give it a token")
    bad = next((t for t in request.prompt if not (isinstance(t, int) and 0 <= t < vocab)), None)
    if bad is not None:
        raise JobInvalid(f"request {rid!r} holds token id {bad!r}, outside the model's "
                         f"vocabulary (0..{vocab - 1})", hint="tokenize with the model's "
                         "tokenizer")
    total = len(request.prompt) + request.params.max_new_tokens
    if total > positions:
        raise JobInvalid(f"request {rid!r}: prompt {len(request.prompt)} + max_new_tokens "
                         f"{request.params.max_new_tokens} = {total} tokens, more than the "
                         f"{positions} positions the job serves",
                         hint="shorten it, or raise serving.max_position / max_seq_len")
    if total > capacity:
        raise JobInvalid(f"request {rid!r} needs {total} tokens of KV cache; one rank holds "
                         f"{capacity} (num_blocks x block_size)",
                         hint="raise serving.num_blocks, or shorten the request")
