"""One rank of ``adp serve``: a persistent rank that takes requests from the HTTP front end while
it runs (``adp_pass/serving/``, docs/serving.md).

Started by torchrun like the offline worker (``runtime/worker.py``), it builds the same model
and engine, then connects back to the front end over TCP (``ADP_SERVE_ADDR``, authenticated by
``ADP_SERVE_TOKEN``) and loops: take new requests and cancels, step the engine once, send each
request's new tokens. Messages are JSON lines.

* Replicated mapping (no collective in the graph): the front end starts every rank as its own
  one-process torchrun job (``ADP_SERVE_RANK`` names its rank in the mapping). The rank never
  joins a process group, so a rank that dies takes only its own requests with it.
* Mappings with collectives: one torchrun job (or several agents with a rendezvous, one per
  node); the ranks of a lockstep group must admit and cancel at the same step, so only the
  group's first rank reads the front end, and it broadcasts what it read to the group before
  every step (``_Inbox``). Only the first rank of an attention group reports tokens (its peers
  sample the same ones).
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time

from adp_pass.launch import rank_device
from adp_pass.mapping import Mapping
from adp_pass.runtime.job import Job

# An idle rank waits this long for a message before stepping again: with lockstep, the group's
# one CPU all-reduce per idle wait is the whole cost of being idle.
IDLE_WAIT_S = 0.05
STATS_EVERY_S = 0.5  # an idle rank still reports its queue and KV use this often


class _Link:
    """The rank's TCP connection to the front end: JSON lines both ways."""

    def __init__(self, address: str, token: str, hello: dict) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.settimeout(None)
        self.buffer = b""
        self.closed = False
        self.send({"type": "hello", "token": token, **hello})

    def send(self, message: dict) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self, timeout: float) -> list[dict]:
        """Every message that arrives within ``timeout`` s (0: only what is there now). The
        front end closing the connection reads as a ``stop``."""
        messages: list[dict] = []
        wait = timeout
        while True:
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                break
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                self.closed = True
                messages.append({"type": "stop", "reason": "the front end closed the connection"})
                break
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            messages += [json.loads(line) for line in lines if line.strip()]
            wait = 0  # drain what else is there, without waiting again
        return messages


class _Inbox:
    """What this rank takes in before a step: read from the front end by the lockstep group's
    first rank, broadcast to the group (every rank applies the same messages at the same step)."""

    def __init__(self, link: _Link, lockstep_group, leader: int, is_leader: bool) -> None:
        self.link, self.group, self.leader, self.is_leader = link, lockstep_group, leader, is_leader

    def take(self, idle: bool) -> list[dict]:
        messages = self.link.receive(IDLE_WAIT_S if idle else 0.0) if self.is_leader else []
        if self.group is None:
            return messages
        import torch.distributed as dist

        box = [messages]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]


def main(job_path: str, out_dir: str) -> None:
    job = Job.read(job_path)
    isolated = "ADP_SERVE_RANK" in os.environ
    rank = int(os.environ["ADP_SERVE_RANK"] if isolated else os.environ["RANK"])
    device = rank_device()
    config = job.config()
    from adp_pass.runtime.engine import RankEngine
    from adp_pass.runtime.worker import build_rank, rank_logger

    log = rank_logger(rank)
    mapping = Mapping.load(job.mapping)
    dp_rank = mapping.dp_rank(rank)
    reports = mapping.attn_group(rank)[0] == rank  # the attention group's first rank
    built = build_rank(job, config, mapping, rank, device, log)

    lockstep = lockstep_group = None
    lockstep_leader = rank
    if not isolated:
        from adp_pass.launch import init_rank
        from adp_pass.runtime.groups import bind_groups, create_groups
        from adp_pass.runtime.lockstep import Lockstep

        init_rank()
        groups = create_groups(mapping)
        bind_groups(built.model, groups.names)
        if mapping.lockstep_size > 1:
            lockstep, lockstep_group = Lockstep(groups.lockstep), groups.lockstep
            lockstep_leader = groups.lockstep_ranks[0]
    engine = RankEngine(
        built.model, built.cache, max_batch=job.max_batch, max_position=job.max_position,
        max_seq_len=job.max_seq_len, cuda_graph_sizes=tuple(job.cuda_graph_sizes) or None,
        seed=job.seed + dp_rank, lockstep=lockstep,
    )
    link = _Link(os.environ["ADP_SERVE_ADDR"], os.environ["ADP_SERVE_TOKEN"], {
        "rank": rank, "dp_rank": dp_rank, "reports": reports, "pid": os.getpid(),
        "host": socket.gethostname(), "lockstep_leader": lockstep_leader,
        "kv_blocks": built.cache.num_blocks, "device": str(device),
    })
    inbox = _Inbox(link, lockstep_group, lockstep_leader, rank == lockstep_leader)
    log("serving")
    reason = _serve(engine, inbox, link, dp_rank, reports)
    log(f"stopping: {reason}")
    if not link.closed:
        link.send({"type": "bye", "rank": rank})
    if not isolated:
        import torch.distributed as dist

        if device.type == "cuda" and mapping.lockstep_size > 1:
            # As in worker.py: NCCL communicators captured in CUDA graphs can block the teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()


def _serve(engine, inbox: _Inbox, link: _Link, dp_rank: int, reports: bool) -> str:
    """The rank's loop until the front end says stop; returns why it stopped."""
    from adp_pass.runtime.engine import Request
    from adp_pass.runtime.sampling import SamplingParams

    sent: dict[str, int] = {}  # request id -> tokens already reported
    idle, last_stats = True, 0.0
    while True:
        events, stop = [], None
        for message in inbox.take(idle):
            kind = message.get("type")
            if kind == "stop":
                stop = message.get("reason", "stop")
            elif message.get("dp_rank") != dp_rank:
                continue  # another DP group of this lockstep group
            elif kind == "add":
                item = message["request"]
                try:
                    engine.add(Request(item["request_id"], list(item["prompt"]), SamplingParams(
                        max_new_tokens=item["max_new_tokens"], temperature=item["temperature"],
                        top_p=item["top_p"], stop_token_ids=tuple(item.get("stop", ())),
                        seed=item.get("seed"))))
                    sent[item["request_id"]] = 0
                except ValueError as err:  # the front end checks first; this is a backstop
                    events.append([item["request_id"], [], None, str(err)])
            elif kind == "cancel":
                engine.cancel(message["request_id"])
                sent.pop(message["request_id"], None)
        if stop is not None:
            return stop
        engine.begin()
        finished = engine.step() if (engine.lockstep is not None or engine.has_work) else []
        idle = not engine.active
        for result in finished:
            done = sent.pop(result.request_id, 0)
            events.append([result.request_id, result.tokens[done:], result.finish_reason, None])
        for request_id, tokens in engine.partial_tokens().items():
            done = sent.get(request_id, 0)
            if len(tokens) > done:
                events.append([request_id, tokens[done:], None, None])
                sent[request_id] = len(tokens)
        now = time.monotonic()
        if reports and (events or now - last_stats >= STATS_EVERY_S):
            link.send({"type": "step", "events": events, "stats": _stats(engine)})
            last_stats = now


def _stats(engine) -> dict:
    cache, stats = engine.cache, engine.stats
    return {"waiting": len(engine.waiting), "running": len(engine.running),
            "kv_used": cache.num_blocks - cache.num_free_blocks, "kv_total": cache.num_blocks,
            "prefill_tokens": stats.prefill_tokens, "decode_tokens": stats.decode_tokens,
            "decode_steps": stats.decode_steps, "decode_s": stats.decode_s}


if __name__ == "__main__":
    try:
        main(*sys.argv[1:3])
    except BaseException as err:  # noqa: BLE001 - recorded, then re-raised for the log
        from adp_pass.runtime.worker import _record_failure

        if os.environ.get("ADP_SERVE_RANK"):  # an isolated rank: RANK is 0 in its own job
            os.environ["RANK"] = os.environ["ADP_SERVE_RANK"]
        _record_failure(sys.argv[2], err)
        raise
