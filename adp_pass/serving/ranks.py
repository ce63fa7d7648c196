"""The persistent ranks behind ``adp serve``: started once with torchrun, reached over TCP.

The front end listens on a TCP port; each rank (``runtime/serve_worker.py``) connects, says
hello with a shared secret, then sends a JSON line per engine step (new tokens, queue and KV
use) and takes ``add`` / ``cancel`` / ``stop`` lines.

The unit of failure and restart is the **lockstep group** (``Mapping.lockstep_size``
consecutive ranks whose graphs meet in collectives; one rank under the replicated mapping): on
one machine each is its own torchrun job (:class:`Unit`), so torchrun, which stops every worker
of a job when one fails, never takes another group down. When a rank of a group dies (its
process exits, its link closes, or it falls silent past ``--rank-timeout``) the rest of its
group is killed, its requests fail, and the group is started again from the build cache
(:class:`RestartPolicy`: bounded attempts, exponential backoff) while the other groups keep
serving. Across machines (``--nnodes``) the ranks are one job of ``nnodes`` agents meeting at a
c10d rendezvous; a lost rank there ends the server (node 1's agent cannot be restarted from
here).
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


@dataclass(frozen=True)
class RestartPolicy:
    """How a group whose rank died is started again. ``attempts`` starts are tried per failure
    (0: never restart: the group stays down); the n-th waits ``backoff_s * 2**(n-1)`` seconds,
    at most ``backoff_max_s``. A group that dies again within ``stable_s`` of its restart spends
    the same budget (a crash loop ends), one that served longer gets a fresh one."""

    attempts: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    stable_s: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)


@dataclass
class Unit:
    """Ranks that fail and restart together: one torchrun job (a replicated rank alone, or a
    lockstep group), or every rank when the job spans machines."""

    index: int
    ranks: list[int]
    dp_groups: list[int]
    restartable: bool
    state: str = "starting"  # starting | up | restarting | failed | stopped
    processes: list[subprocess.Popen] = field(default_factory=list)  # its torchrun agent(s)
    token: str = ""  # what its ranks prove in their hello: a new one for every start
    spent: int = 0  # restart attempts spent from the current budget
    restarts: int = 0  # restarts that served again
    failed_starts: int = 0  # restart attempts that did not
    up_since: float = 0.0
    error: str | None = None
    task: asyncio.Task | None = None
    killed: list[int] = field(default_factory=list)  # pids of its ranks killed here


class RankSet:
    """Start, reach, restart and stop the ranks of one serving job."""

    def __init__(self, mapping: Mapping, job_dir: Path, log_path: Path, *, nnodes: int = 1,
                 node: NodeSpec | None = None, bind_host: str = "127.0.0.1", echo: bool = True,
                 silence_timeout_s: float | None = None,
                 restart: RestartPolicy = RestartPolicy(), start_timeout_s: float = 1800.0,
                 on_step: Callable[[RankInfo, Step], None] | None = None,
                 on_lost: Callable[[Unit, str], None] | None = None,
                 on_restored: Callable[[Unit], None] | None = None) -> None:
        self.mapping, self.job_dir, self.log_path = mapping, job_dir, log_path
        self.nnodes, self.bind_host, self.echo = nnodes, bind_host, echo
        self.isolated = mapping.lockstep_size == 1
        self.ranks = {r: RankInfo(r) for r in range(mapping.world_size)}
        self.node = node
        self.silence_timeout_s = silence_timeout_s
        self.restart, self.start_timeout_s = restart, start_timeout_s
        self.token = node.token if node is not None else secrets.token_hex(16)
        self.on_step, self.on_lost, self.on_restored = on_step, on_lost, on_restored
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._address = ""
        self._log_lock = threading.Lock()
        self._monitor: asyncio.Task | None = None
        # One machine: a unit per lockstep group. Several: one unit of every rank, which the
        # other machines' agents share, so it is not restarted from here.
        world = mapping.world_size
        size = mapping.lockstep_size if node is None and nnodes == 1 else world
        self.units = [Unit(i, list(range(first, first + size)),
                           sorted({mapping.dp_rank(r) for r in range(first, first + size)}),
                           restartable=node is None and nnodes == 1)
                      for i, first in enumerate(range(0, world, size))]
        self._unit_of = {r: u for u in self.units for r in u.ranks}

    @property
    def processes(self) -> list[subprocess.Popen]:
        return [p for unit in self.units for p in unit.processes]

    def unit_of(self, rank: int) -> Unit:
        return self._unit_of[rank]

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        # Ranks on other machines reach node 0's link on every interface, at a known port.
        bind, port = ("0.0.0.0", self.node.link_port) if self.node else (self.bind_host, 0)
        self._server = await asyncio.start_server(self._connection, bind, port, limit=1 << 24)
        port = self._server.sockets[0].getsockname()[1]
        host = "127.0.0.1" if self.node else self.bind_host
        self._address = f"{host}:{port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        for unit in self.units:
            self._spawn_unit(unit)
        self._monitor = asyncio.get_running_loop().create_task(self._watch_processes())

    def _spawn_unit(self, unit: Unit) -> None:
        """Start ``unit``'s torchrun job(s), with a token of their own: a rank of an earlier
        start of the same group (one that outlived its kill) is turned away."""
        world = self.mapping.world_size
        unit.token = self.token if self.node is not None or self.nnodes > 1 else \
            secrets.token_hex(16)
        env = rank_environment(ADP_SERVE_ADDR=self._address, ADP_SERVE_TOKEN=unit.token)
        env.pop("ADP_SERVE_FIRST_RANK", None)
        unit.processes = []
        if self.node is not None:  # this machine's agent; the others start theirs
            self._spawn(unit, agent_command(self.job_dir, world, self.nnodes,
                                            self.node.rdzv_endpoint, run_id_for(self.token)), env)
            return
        if self.nnodes > 1:
            rdzv, run_id = f"127.0.0.1:{free_port()}", f"adp-serve-{uuid.uuid4().hex[:8]}"
            for _ in range(self.nnodes):  # one agent per "node", met at one rendezvous
                self._spawn(unit, agent_command(self.job_dir, world, self.nnodes, rdzv, run_id),
                            env)
            return
        first = unit.ranks[0]
        # A replicated rank: rank 0 of its own job, ADP_SERVE_RANK naming its place in the
        # mapping (it joins no group). A lockstep group: its job's rank r is mapping rank
        # first + r, and the process group holds the group alone.
        env.update({"ADP_SERVE_RANK": str(first)} if self.isolated else
                   {"ADP_SERVE_FIRST_RANK": str(first)})
        if job_device() == "cuda":
            # Each job sees its own GPUs; CPU ranks (--device cpu on a GPU machine) keep the
            # machine's view, so every rank picks the same Triton mode.
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else [str(r) for r in range(world)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[r % len(devices)] for r in unit.ranks)
        self._spawn(unit, torchrun_command(SERVE_WORKER, self.job_dir, len(unit.ranks)), env)

    def _spawn(self, unit: Unit, command: list[str], env: dict) -> None:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._pump, args=(process,), daemon=True).start()
        unit.processes.append(process)

    def _pump(self, process: subprocess.Popen) -> None:
        with self.log_path.open("a") as sink:
            pump_lines(process.stdout, sink, sys.stderr if self.echo else None, self._log_lock)

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every rank has said hello; a rank that fails first raises its own error."""
        deadline = time.monotonic() + timeout_s
        while not all(info.state == "ready" for info in self.ranks.values()):
            for process in self.processes:
                if process.poll() is not None:
                    raise self._failure(process.returncode)
            if time.monotonic() > deadline:
                waiting = [r for r, i in self.ranks.items() if i.state != "ready"]
                raise RankFailed(f"ranks {waiting} were not ready within {timeout_s:.0f} s",
                                 log=str(self.log_path),
                                 hint=f"their output is in {self.log_path}; raise "
                                 "--start-timeout for a big model")
            await asyncio.sleep(0.1)
        now = time.monotonic()
        for unit in self.units:
            unit.state, unit.up_since = "up", now

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
            if not isinstance(hello, Hello):
                writer.close()
                return
            # Every unit's token is compared (constant time each), so no timing tells which.
            matches = [u for u in self.units if secrets.compare_digest(hello.token, u.token)]
            unit = self._unit_of.get(hello.rank)
            if unit is None or unit not in matches or unit.state in ("failed", "stopped"):
                writer.close()
                return
            info = self.ranks[hello.rank]
            info.dp_rank, info.reports = hello.dp_rank, hello.reports
            info.lockstep_leader, info.pid, info.host = (hello.lockstep_leader, hello.pid,
                                                         hello.host)
            info.writer, info.state, info.error = writer, "ready", None
            info.last_seen = time.monotonic()
            while True:
                line = await reader.readline()
                if not line or info.writer is not writer:  # closed, or a newer start took over
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
            if info is not None and info.writer is writer and info.state == "ready":
                await asyncio.sleep(0.3)  # let the process exit, so its error record is there
                if info.writer is writer:
                    self._lost(info, "its connection closed")

    def _lost(self, info: RankInfo, why: str) -> None:
        """A rank is gone: its whole unit is. A unit still starting is left to the wait on its
        start (which sees the process exit); one that served fails its requests and restarts,
        or, out of attempts or not restartable, stays down."""
        if self.stopping:
            info.state = "stopped"
            return
        if info.state in ("dead", "stopped"):
            return
        unit = self.unit_of(info.rank)
        own = self.rank_error(info.rank)
        error = f"rank {info.rank} died ({why})" + (f": {own}" if own else "")
        if unit.state != "up":
            info.state, info.error = "dead", error
            return
        info.error = unit.error = error
        self._kill_unit(unit)
        now = time.monotonic()
        if now - unit.up_since >= self.restart.stable_s:
            unit.spent = 0
        if unit.restartable and unit.spent < self.restart.attempts:
            unit.state = "restarting"
            unit.task = asyncio.get_running_loop().create_task(self._restart(unit))
        else:
            unit.state = "failed"
        print(f"adp serve: {error}; {self._describe(unit)} "
              + ("restarting" if unit.state == "restarting" else "down"), file=sys.stderr,
              flush=True)
        if self.on_lost is not None:
            self.on_lost(unit, error)

    def _describe(self, unit: Unit) -> str:
        groups = ", ".join(map(str, unit.dp_groups))
        return (f"rank{'s' * (len(unit.ranks) > 1)} {unit.ranks[0]}"
                + (f"-{unit.ranks[-1]}" if len(unit.ranks) > 1 else "")
                + f" (DP group{'s' * (len(unit.dp_groups) > 1)} {groups})")

    def _kill_unit(self, unit: Unit) -> None:
        """Take down what is left of ``unit``: its agents' process groups, and its ranks by pid
        (torchrun gives each worker a session of its own, so a rank stuck in a collective with a
        dead peer would outlive its agent)."""
        here = socket.gethostname()
        for r in unit.ranks:
            info = self.ranks[r]
            if info.pid and info.host == here and info.state in ("starting", "ready"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(info.pid, signal.SIGKILL)
                    unit.killed.append(info.pid)
            if info.state in ("starting", "ready"):
                info.state = "dead"
            if info.writer is not None:  # a rank elsewhere reads the close as its stop
                with contextlib.suppress(Exception):
                    info.writer.close()
            info.writer = None
        for process in unit.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

    async def _restart(self, unit: Unit) -> None:
        """Start ``unit`` again until it serves or its attempts are spent; then tell the
        state either way."""
        policy = self.restart
        while unit.spent < policy.attempts and not self.stopping:
            unit.spent += 1
            delay = policy.delay(unit.spent)
            print(f"adp serve: restarting {self._describe(unit)} in {delay:g} s (attempt "
                  f"{unit.spent} of {policy.attempts})", file=sys.stderr, flush=True)
            await asyncio.sleep(delay)
            await self._reap(unit)
            if self.stopping:
                return
            for r in unit.ranks:  # stale records would be blamed for this start's failure
                with contextlib.suppress(OSError):
                    RankFailure(r, "", "").path(self.job_dir).unlink()
                self.ranks[r] = RankInfo(r)
            self._spawn_unit(unit)
            try:
                await self._wait_unit(unit)
            except RankFailed as err:
                unit.failed_starts += 1
                unit.error = f"restart failed: {err}"
                print(f"adp serve: {self._describe(unit)}: {unit.error}", file=sys.stderr,
                      flush=True)
                self._kill_unit(unit)
                continue
            unit.state, unit.up_since, unit.error = "up", time.monotonic(), None
            unit.restarts += 1
            print(f"adp serve: {self._describe(unit)} serving again (restart {unit.restarts})",
                  file=sys.stderr, flush=True)
            if self.on_restored is not None:
                self.on_restored(unit)
            return
        if self.stopping:
            return
        unit.state = "failed"
        why = (f"{self._describe(unit)} could not be restarted in {policy.attempts} attempt"
               f"{'s' * (policy.attempts != 1)}: {unit.error}")
        print(f"adp serve: giving up: {why}", file=sys.stderr, flush=True)
        if self.on_lost is not None:
            self.on_lost(unit, why)

    async def _reap(self, unit: Unit, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for the killed agents and ranks to be gone, so the new start does not
        race them for ports or GPU memory."""
        deadline = time.monotonic() + timeout_s
        while (any(p.poll() is None for p in unit.processes)
               or any(map(_running, unit.killed))) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unit.killed.clear()

    async def _wait_unit(self, unit: Unit) -> None:
        """Until every rank of a restarted ``unit`` said hello; raises when its job exits, a
        rank is lost meanwhile, or --start-timeout passes."""
        deadline = time.monotonic() + self.start_timeout_s
        while not all(self.ranks[r].state == "ready" for r in unit.ranks):
            if self.stopping:
                raise RankFailed("the server is stopping")
            dead = [r for r in unit.ranks if self.ranks[r].state == "dead"]
            exited = [p.returncode for p in unit.processes if p.poll() is not None]
            if dead or exited:
                await asyncio.sleep(0.3)  # its error record, if it writes one
                own = next((e for e in map(self.rank_error, unit.ranks) if e), None)
                raise RankFailed(own or (f"its job exited with code {exited[0]}" if exited else
                                         f"rank {dead[0]} was lost while starting"),
                                 log=str(self.log_path))
            if time.monotonic() > deadline:
                raise RankFailed(f"not ready within {self.start_timeout_s:.0f} s "
                                 "(--start-timeout)", log=str(self.log_path))
            await asyncio.sleep(0.1)

    async def _watch_processes(self) -> None:
        while not self.stopping:
            for unit in self.units:
                if unit.state != "up":
                    continue  # a start in progress watches its own processes
                code = next((p.returncode for p in unit.processes if p.poll() is not None), None)
                if code is None:
                    continue
                # An agent's ranks are whichever the rendezvous gave it, and any loss stops
                # the unit: blame the first rank still counted as serving.
                alive = [r for r in unit.ranks if self.ranks[r].state in ("starting", "ready")]
                if alive:
                    self._lost(self.ranks[alive[0]], f"its torchrun job exited with code {code}")
            self._check_silence()
            await asyncio.sleep(0.2)

    def _check_silence(self) -> None:
        """A reporting rank speaks every step and every 0.5 s when idle: one silent for longer
        than the timeout is hung (a stuck kernel or collective). It is killed and counted lost,
        so its requests fail instead of waiting forever."""
        if self.silence_timeout_s is None:
            return
        now = time.monotonic()
        for info in list(self.ranks.values()):
            if info.state == "ready" and info.reports and \
                    now - info.last_seen > self.silence_timeout_s:
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
        size = self.mapping.lockstep_size  # groups are consecutive blocks of ranks
        return self.ranks[group * self.mapping.attn_tp_size // size * size]

    def send(self, group: int, message: Message) -> bool:
        info = self.leader_of(group)
        if info.state != "ready" or info.writer is None:
            return False
        info.writer.write(encode_message(message))
        return True

    def groups(self) -> int:
        return self.mapping.dp_size

    def restarting(self) -> bool:
        return any(u.state == "restarting" for u in self.units)

    # ------------------------------------------------------------------ stop
    async def stop(self, timeout_s: float = 30.0) -> None:
        """Ask every rank to stop, wait for the torchrun jobs, kill what is left."""
        self.stopping = True
        for unit in self.units:
            if unit.task is not None:
                unit.task.cancel()
            if unit.state == "restarting":  # still building: nothing to finish, nobody to tell
                self._kill_unit(unit)
        for info in self.ranks.values():
            if info.writer is not None and info.state == "ready":
                with contextlib.suppress(Exception):
                    info.writer.write(encode_message(Stop("server shutdown")))
                    await info.writer.drain()
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in self.processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.kill()
        if self._server is not None:
            self._server.close()
        if self._monitor is not None:
            self._monitor.cancel()

    def kill(self) -> None:
        """The torchrun agents and, by pid, the ranks on this host (torchrun gives each worker
        a session of its own, so killing an agent's group leaves a stuck rank running)."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        here = socket.gethostname()
        for info in self.ranks.values():
            # Only ranks still taken as alive: a dead one's pid may belong to another process.
            if info.pid and info.host == here and info.state == "ready":
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(info.pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """``pid`` still runs: exists and is not a zombie (a rank killed after its agent is
    reparented, and its zombie, holding nothing, may wait for a reaper that never comes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
