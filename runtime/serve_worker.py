"""One rank of ``adp serve``: a persistent rank that takes requests from the HTTP front end while
it runs (``adp_pass/serving/``, docs/serving.md).

Started by the launcher (``adp_pass/launch.py``) like a batch rank, it starts the same way
(``runtime/rank.py``), then connects back to the front end over TCP (``ADP_SERVE_ADDR``,
authenticated by ``ADP_SERVE_TOKEN``) and loops: take new requests and cancels, step the engine
once, send each request's new tokens. The link speaks the contract's serve messages
(``runtime/contract.py``), one JSON line each.

* Replicated mapping (no collective in the graph): every rank is its own one-process job
  (``ADP_SERVE_RANK`` names its rank in the mapping). The rank never joins a process group, so a
  rank that dies takes only its own requests with it.
* Mappings with collectives: one job per lockstep group on one machine
  (``ADP_SERVE_FIRST_RANK`` names the group's first rank in the mapping: the job's rank r is
  mapping rank first + r), so a group fails and restarts alone; across machines one job of
  every rank (several agents with a rendezvous, one per node). The ranks of a lockstep group
  must admit and cancel at the same step, so only the group's first rank reads the front end,
  and it broadcasts what it read to the group before every step (``_Inbox``). Only the first
  rank of an attention group reports tokens (its peers sample the same ones).
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time

from adp_pass.launch import record_failure
from adp_pass.runtime.contract import (
    Add, Bye, Cancel, Hello, Job, Message, RankLoad, Step, Stop, TokenEvent, decode_message,
    encode_message)
from adp_pass.runtime.rank import RankSession, start_rank

# An idle rank waits this long for a message before stepping again: with lockstep, the group's
# one CPU all-reduce per idle wait is the whole cost of being idle.
IDLE_WAIT_S = 0.05
STATS_EVERY_S = 0.5  # an idle rank still reports its queue and KV use this often


class _Link:
    """The rank's TCP connection to the front end: serve messages both ways."""

    def __init__(self, address: str, hello: Hello) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.settimeout(None)
        self.buffer = b""
        self.closed = False
        self.send(hello)

    def send(self, message: Message) -> None:
        self.sock.sendall(encode_message(message))

    def receive(self, timeout: float) -> list[Message]:
        """Every message that arrives within ``timeout`` s (0: only what is there now). The
        front end closing the connection reads as a :class:`Stop`."""
        messages: list[Message] = []
        wait = timeout
        while True:
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                break
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                self.closed = True
                messages.append(Stop("the front end closed the connection"))
                break
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            messages += [decode_message(line) for line in lines if line.strip()]
            wait = 0  # drain what else is there, without waiting again
        return messages


class _Inbox:
    """What this rank takes in before a step: read from the front end by the lockstep group's
    first rank, broadcast to the group (every rank applies the same messages at the same step)."""

    def __init__(self, link: _Link, session: RankSession) -> None:
        self.link, self.group, self.leader = link, session.lockstep_group, session.lockstep_leader
        self.reads = session.rank == session.lockstep_leader
        self.src = session.lockstep_leader - session.first_rank  # its rank in this job's group

    def take(self, idle: bool) -> list[Message]:
        messages = self.link.receive(IDLE_WAIT_S if idle else 0.0) if self.reads else []
        if self.group is None:
            return messages
        import torch.distributed as dist

        box = [messages]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]


def main(job_path: str, out_dir: str) -> None:
    job = Job.read(job_path)
    isolated = "ADP_SERVE_RANK" in os.environ
    first = int(os.environ.get("ADP_SERVE_FIRST_RANK", 0))
    rank = _mapping_rank()
    session = start_rank(job, rank, join=not isolated, first_rank=first)
    link = _Link(os.environ["ADP_SERVE_ADDR"], Hello(
        token=os.environ["ADP_SERVE_TOKEN"], rank=rank, dp_rank=session.dp_rank,
        reports=session.leader, pid=os.getpid(), host=socket.gethostname(),
        lockstep_leader=session.lockstep_leader, kv_blocks=session.built.cache.num_blocks,
        device=str(session.device)))
    session.log("serving")
    reason = _serve(session, _Inbox(link, session), link)
    session.log(f"stopping: {reason}")
    if not link.closed:
        link.send(Bye(rank))
    session.close()


def _mapping_rank() -> int:
    """This rank's place in the mapping: ``ADP_SERVE_RANK`` (a replicated rank, rank 0 of its
    own job), else the job's rank after its lockstep group's first rank."""
    if "ADP_SERVE_RANK" in os.environ:
        return int(os.environ["ADP_SERVE_RANK"])
    return int(os.environ.get("ADP_SERVE_FIRST_RANK", 0)) + int(os.environ.get("RANK", 0))


def _serve(session: RankSession, inbox: _Inbox, link: _Link) -> str:
    """The rank's loop until the front end says stop; returns why it stopped."""
    engine, dp_rank = session.engine, session.dp_rank
    sent: dict = {}  # request id -> tokens already reported
    idle, last_load = True, 0.0
    while True:
        events: list[TokenEvent] = []
        for message in inbox.take(idle):
            if isinstance(message, Stop):
                return message.reason
            if isinstance(message, (Add, Cancel)) and message.dp_rank != dp_rank:
                continue  # another DP group of this lockstep group
            if isinstance(message, Add):
                request = message.request
                try:
                    engine.add(request)
                    sent[request.request_id] = 0
                except ValueError as err:  # the front end checks first; this is a backstop
                    events.append(TokenEvent(request.request_id, [], None, str(err)))
            elif isinstance(message, Cancel):
                engine.cancel(message.request_id)
                sent.pop(message.request_id, None)
        engine.begin()
        finished = engine.step() if (engine.lockstep is not None or engine.has_work) else []
        idle = not engine.active
        for result in finished:
            done = sent.pop(result.request_id, 0)
            events.append(TokenEvent(result.request_id, result.tokens[done:],
                                     result.finish_reason))
        for request_id, tokens in engine.partial_tokens().items():
            done = sent.get(request_id, 0)
            if len(tokens) > done:
                events.append(TokenEvent(request_id, tokens[done:]))
                sent[request_id] = len(tokens)
        now = time.monotonic()
        if session.leader and (events or now - last_load >= STATS_EVERY_S):
            link.send(Step(events, _load(engine)))
            last_load = now


def _load(engine) -> RankLoad:
    cache, stats = engine.cache, engine.stats
    return RankLoad(waiting=len(engine.waiting), running=len(engine.running),
                    kv_used=cache.num_blocks - cache.num_free_blocks, kv_total=cache.num_blocks,
                    prefill_tokens=stats.prefill_tokens, decode_tokens=stats.decode_tokens,
                    decode_steps=stats.decode_steps, decode_s=stats.decode_s)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:3])
    except BaseException as err:  # noqa: BLE001 - recorded, then re-raised for the log
        record_failure(sys.argv[2], _mapping_rank(), err)
        raise
