"""The persistent ranks behind ``adp serve``: started once with torchrun, reached over TCP.

The front end listens on a TCP port; each rank (``runtime/serve_worker.py``) connects, says
hello with a shared secret, then sends a JSON line per engine step (new tokens, queue and KV
use) and takes ``add`` / ``cancel`` / ``stop`` lines.

How the ranks are started depends on what a rank's death may take with it:

* **replicated** mapping (``Mapping.lockstep_size == 1``: no collective in any rank's graph):
  every rank is its own one-process torchrun job. torchrun stops every worker of a job when one
  fails; here a job is one rank, so a rank that dies takes only its own requests.
* **collective** mappings: one torchrun job of ``world_size`` ranks (``nnodes`` agents with a
  c10d rendezvous when asked, as on several machines): a rank that dies stops the whole group
  (torchrun), and the server fails every request and exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adp_pass.launch import (RankFailed, free_port, job_device, job_failure, pump_lines,
                             rank_environment, torchrun_command)
from adp_pass.mapping import Mapping
from adp_pass.runtime.contract import (
    Bye, ContractError, Hello, Message, RankFailure, RankLoad, Step, Stop, decode_message,
    encode_message, from_json)

SERVE_WORKER = "adp_pass.runtime.serve_worker"


@dataclass(frozen=True)
class NodeSpec:
    """This machine's part of a job over several machines (``adp serve --node-rank``): its
    torchrun agent meets the others at ``rdzv_endpoint`` (c10d); node 0 runs the front end,
    whose rank link listens on ``link_port`` of every interface, authenticated by ``token``
    (``ADP_SERVE_TOKEN``, the same on every node)."""

    node_rank: int
    rdzv_endpoint: str
    link_port: int
    token: str

    @property
    def front_end(self) -> str:
        """Where node 0's rank link listens, as the other nodes reach it."""
        return f"{self.rdzv_endpoint.rsplit(':', 1)[0]}:{self.link_port}"


def agent_command(job_dir: Path, world: int, nnodes: int, rdzv_endpoint: str,
                  run_id: str) -> list[str]:
    """One torchrun agent of ``world // nnodes`` serving ranks, meeting the others at a c10d
    rendezvous."""
    return torchrun_command(SERVE_WORKER, job_dir, world // nnodes, nnodes=nnodes,
                            rdzv_endpoint=rdzv_endpoint, run_id=run_id)


def run_id_for(token: str) -> str:
    """The rendezvous id every node derives alike from the shared token."""
    import hashlib

    return "adp-serve-" + hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass
class RankInfo:
    rank: int
    state: str = "starting"  # starting | ready | dead | stopped
    dp_rank: int | None = None
    reports: bool = False  # sends its DP group's tokens (the attention group's first rank)
    lockstep_leader: int | None = None
    pid: int | None = None
    host: str | None = None
    writer: asyncio.StreamWriter | None = None
    load: RankLoad = field(default_factory=RankLoad)
    error: str | None = None
    last_seen: float = 0.0  # monotonic time of its last message


class RankSet:
    """Start, reach and stop the ranks of one serving job."""

    def __init__(self, mapping: Mapping, job_dir: Path, log_path: Path, *, nnodes: int = 1,
                 node: NodeSpec | None = None, bind_host: str = "127.0.0.1", echo: bool = True,
                 silence_timeout_s: float | None = None,
                 on_step: Callable[[RankInfo, Step], None] | None = None,
                 on_lost: Callable[[RankInfo, str], None] | None = None) -> None:
        self.mapping, self.job_dir, self.log_path = mapping, job_dir, log_path
        self.nnodes, self.bind_host, self.echo = nnodes, bind_host, echo
        self.isolated = mapping.lockstep_size == 1
        self.ranks = {r: RankInfo(r) for r in range(mapping.world_size)}
        self.node = node
        self.silence_timeout_s = silence_timeout_s
        self.token = node.token if node is not None else secrets.token_hex(16)
        self.on_step, self.on_lost = on_step, on_lost
        self.processes: list[tuple[list[int], subprocess.Popen]] = []  # (ranks, torchrun)
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._ready = asyncio.Event()
        self._log_lock = threading.Lock()
        self._monitor: asyncio.Task | None = None

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        # Ranks on other machines reach node 0's link on every interface, at a known port.
        bind, port = ("0.0.0.0", self.node.link_port) if self.node else (self.bind_host, 0)
        self._server = await asyncio.start_server(self._connection, bind, port, limit=1 << 24)
        port = self._server.sockets[0].getsockname()[1]
        host = "127.0.0.1" if self.node else self.bind_host
        env = rank_environment(ADP_SERVE_ADDR=f"{host}:{port}", ADP_SERVE_TOKEN=self.token)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        world = self.mapping.world_size
        if self.isolated:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else [str(r) for r in range(world)]
            on_gpus = job_device() == "cuda"
            for r in range(world):
                # Each its own job, so torchrun never takes a healthy rank down with a dead one.
                # Each sees its own GPU; CPU ranks (--device cpu on a GPU machine) keep the
                # machine's view, so every rank picks the same Triton mode.
                rank_env = dict(env, ADP_SERVE_RANK=str(r))
                if on_gpus:
                    rank_env["CUDA_VISIBLE_DEVICES"] = devices[r % len(devices)]
                self._spawn([r], torchrun_command(SERVE_WORKER, self.job_dir, 1), rank_env)
        elif self.node is not None:  # this machine's agent; the others start theirs
            self._spawn(list(range(world)), agent_command(
                self.job_dir, world, self.nnodes, self.node.rdzv_endpoint,
                run_id_for(self.token)), env)
        elif self.nnodes == 1:
            self._spawn(list(range(world)), torchrun_command(SERVE_WORKER, self.job_dir, world),
                        env)
        else:
            rdzv, run_id = f"127.0.0.1:{free_port()}", f"adp-serve-{uuid.uuid4().hex[:8]}"
            for _ in range(self.nnodes):  # one agent per "node", met at one rendezvous
                self._spawn(list(range(world)), agent_command(self.job_dir, world, self.nnodes,
                                                              rdzv, run_id), env)
        self._monitor = asyncio.get_running_loop().create_task(self._watch_processes())

    def _spawn(self, ranks: list[int], command: list[str], env: dict) -> None:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._pump, args=(process,), daemon=True).start()
        self.processes.append((ranks, process))

    def _pump(self, process: subprocess.Popen) -> None:
        with self.log_path.open("a") as sink:
            pump_lines(process.stdout, sink, sys.stderr if self.echo else None, self._log_lock)

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every rank has said hello; a rank that fails first raises its own error."""
        deadline = time.monotonic() + timeout_s
        while not all(info.state == "ready" for info in self.ranks.values()):
            for ranks, process in self.processes:
                if process.poll() is not None:
                    raise self._failure(process.returncode)
            if time.monotonic() > deadline:
                waiting = [r for r, i in self.ranks.items() if i.state != "ready"]
                raise RankFailed(f"ranks {waiting} were not ready within {timeout_s:.0f} s",
                                 log=str(self.log_path),
                                 hint=f"their output is in {self.log_path}; raise "
                                 "--start-timeout for a big model")
            await asyncio.sleep(0.1)

    def _failure(self, returncode: int) -> RankFailed:
        return job_failure(self.job_dir, returncode, self.log_path)

    def rank_error(self, rank: int) -> str | None:
        """A rank's own error record, if it left one."""
        path = RankFailure(rank, "", "").path(self.job_dir)
        with contextlib.suppress(OSError, ValueError, ContractError):
            failure = from_json(RankFailure, json.loads(path.read_text()))
            return f"{failure.type}: {failure.message}"
        return None

    # ------------------------------------------------------------------ connections
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        info = None
        try:
            hello = decode_message(await asyncio.wait_for(reader.readline(), 30))
            if not isinstance(hello, Hello) or not secrets.compare_digest(hello.token,
                                                                          self.token):
                writer.close()
                return
            info = self.ranks[hello.rank]
            info.dp_rank, info.reports = hello.dp_rank, hello.reports
            info.lockstep_leader, info.pid, info.host = (hello.lockstep_leader, hello.pid,
                                                         hello.host)
            info.writer, info.state = writer, "ready"
            info.last_seen = time.monotonic()
            while True:
                line = await reader.readline()
                if not line:
                    break
                info.last_seen = time.monotonic()
                message = decode_message(line)
                if isinstance(message, Step):
                    info.load = message.load
                    if self.on_step is not None:
                        self.on_step(info, message)
                elif isinstance(message, Bye):
                    info.state = "stopped"
        except (asyncio.TimeoutError, ConnectionError, ValueError, KeyError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            if info is not None and info.state == "ready":
                await asyncio.sleep(0.3)  # let the process exit, so its error record is there
                self._lost(info, "its connection closed")

    def _lost(self, info: RankInfo, why: str) -> None:
        if info.state in ("dead", "stopped") or self.stopping:
            info.state = "stopped" if self.stopping else info.state
            return
        info.state = "dead"
        own = self.rank_error(info.rank)
        info.error = f"rank {info.rank} died ({why})" + (f": {own}" if own else "")
        if self.on_lost is not None:
            self.on_lost(info, info.error)

    async def _watch_processes(self) -> None:
        while not self.stopping:
            for ranks, process in self.processes:
                code = process.poll()
                if code is None:
                    continue
                # Collective mappings: an agent's ranks are whichever the rendezvous gave it,
                # and any loss stops the group: blame the first rank still counted as serving.
                for r in ranks:
                    if self.ranks[r].state in ("starting", "ready"):
                        self._lost(self.ranks[r], f"its torchrun job exited with code {code}")
                        if not self.isolated:
                            break
            self._check_silence()
            await asyncio.sleep(0.2)

    def _check_silence(self) -> None:
        """A reporting rank speaks every step and every 0.5 s when idle: one silent for longer
        than the timeout is hung (a stuck kernel or collective). It is killed and counted lost,
        so its requests fail instead of waiting forever."""
        if self.silence_timeout_s is None:
            return
        now = time.monotonic()
        for info in self.ranks.values():
            if info.state == "ready" and info.reports and \
                    now - info.last_seen > self.silence_timeout_s:
                for ranks, process in self.processes:
                    if self.isolated and info.rank in ranks and process.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(process.pid, signal.SIGKILL)
                # torchrun starts its workers in sessions of their own: a stopped or stuck rank
                # outlives its agent, so it is killed by its own pid (when it runs here).
                if info.pid and info.host == socket.gethostname():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(info.pid, signal.SIGKILL)
                self._lost(info, f"no word from it for {self.silence_timeout_s:g} s: hung "
                           "(--rank-timeout)")

    # ------------------------------------------------------------------ messages
    def leader_of(self, group: int) -> RankInfo:
        """The rank that reads the front end for DP group ``group``: the first rank of its
        lockstep group."""
        member = next(i for i in self.ranks.values() if i.dp_rank == group)
        return self.ranks[member.lockstep_leader]

    def send(self, group: int, message: Message) -> bool:
        info = self.leader_of(group)
        if info.state != "ready" or info.writer is None:
            return False
        info.writer.write(encode_message(message))
        return True

    def groups(self) -> int:
        return self.mapping.dp_size

    # ------------------------------------------------------------------ stop
    async def stop(self, timeout_s: float = 30.0) -> None:
        """Ask every rank to stop, wait for the torchrun jobs, kill what is left."""
        self.stopping = True
        for info in self.ranks.values():
            if info.writer is not None and info.state == "ready":
                with contextlib.suppress(Exception):
                    info.writer.write(encode_message(Stop("server shutdown")))
                    await info.writer.drain()
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for _, p in self.processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.kill()
        if self._server is not None:
            self._server.close()
        if self._monitor is not None:
            self._monitor.cancel()

    def kill(self) -> None:
        """The torchrun agents and, by pid, the ranks on this host (torchrun gives each worker
        a session of its own, so killing an agent's group leaves a stuck rank running)."""
        for _, process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        here = socket.gethostname()
        for info in self.ranks.values():
            # Only ranks still taken as alive: a dead one's pid may belong to another process.
            if info.pid and info.host == here and info.state == "ready":
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(info.pid, signal.SIGKILL)
