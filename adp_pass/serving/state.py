"""The front end's view of the serving job: requests in flight, the router, the ranks, metrics.

Everything here runs on the server's one asyncio loop (the HTTP handlers and the rank
connections), so it needs no locks.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field

from adp_pass.runtime.contract import Add, Cancel, Request, SamplingParams, Step
from adp_pass.serving.metrics import (
    E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, Histogram, family)
from adp_pass.serving.protocol import APIError, Generation, ModelLimits
from adp_pass.serving.ranks import RankInfo, RankSet, Unit
from adp_pass.serving.router import NoLiveRank, Overloaded, Router

RETRY_AFTER_S = 1
RESTART_RETRY_AFTER_S = 5  # a restart from the build cache takes seconds


class RankLost(Exception):
    """The rank serving a request died (or the whole job failed)."""


@dataclass
class Flight:
    """One engine request (one choice of one HTTP request) on its DP group."""

    request_id: str
    group: int
    prompt_len: int
    max_tokens: int
    arrived: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: int = 0
    first: float | None = None
    last: float | None = None
    done: bool = False


class ServingState:
    def __init__(self, ranks: RankSet, limits: ModelLimits, tokenizer, *, max_queue: int,
                 shutdown_timeout_s: float) -> None:
        self.ranks, self.limits, self.tokenizer = ranks, limits, tokenizer
        self.router = Router(ranks.groups(), max_queue)
        self.flights: dict[str, Flight] = {}
        self.shutdown_timeout_s = shutdown_timeout_s
        self.draining = False  # SIGTERM: finishing what is in flight, refusing new requests
        self.forced = False  # a second signal: stop waiting for them
        self.failed: str | None = None  # collective mapping lost a rank: the server is going down
        self.exit_code = 0
        self.stop_event = asyncio.Event()
        self.started = time.time()
        ranks.on_step, ranks.on_lost, ranks.on_restored = (self._on_step, self._on_lost,
                                                           self._on_restored)
        self.requests_total = {"ok": 0, "error": 0, "cancelled": 0, "rejected": 0}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.tokens_by_group = [0] * self.router.groups
        self.ttft = Histogram("adp_time_to_first_token_seconds",
                              "Time from arrival to the first generated token", TTFT_BUCKETS)
        self.tpot = Histogram("adp_time_per_output_token_seconds",
                              "Mean time per generated token after the first, per request",
                              TPOT_BUCKETS)
        self.e2e = Histogram("adp_e2e_request_latency_seconds",
                             "Time from arrival to the last token", E2E_BUCKETS)

    # ------------------------------------------------------------------ requests
    def check_open(self) -> None:
        if self.failed:
            raise APIError(503, f"the server is failing: {self.failed}", type="server_error",
                           code="server_failed")
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests; retry "
                           "on another replica", type="server_error", code="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def submit(self, gen: Generation) -> list[Flight]:
        """Route every choice of ``gen`` (prompts x n) to a DP group and send it there."""
        self.check_open()
        flights = []
        base = uuid.uuid4().hex[:16]
        try:
            for p, prompt in enumerate(gen.prompts):
                for i in range(gen.n):
                    index = p * gen.n + i
                    flights.append(self._send(f"{base}-{index}", prompt, gen,
                                              None if gen.seed is None else gen.seed + i))
        except APIError:
            for flight in flights:
                self.cancel(flight)
            raise
        self.prompt_tokens_total += sum(len(p) for p in gen.prompts) * gen.n
        return flights

    def _send(self, request_id: str, prompt: list[int], gen: Generation, seed) -> Flight:
        try:
            group = self.router.pick(len(prompt), gen.max_tokens)
        except Overloaded as err:
            self.requests_total["rejected"] += 1
            raise APIError(429, f"the server is overloaded: {err}; retry after "
                           f"{RETRY_AFTER_S} s", type="server_overloaded", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except NoLiveRank as err:
            if self.ranks.restarting():
                raise APIError(503, "no DP group is serving now: the ranks are restarting after "
                               f"a failure; retry after {RESTART_RETRY_AFTER_S} s",
                               type="server_error", code="restarting",
                               headers={"Retry-After": str(RESTART_RETRY_AFTER_S)}) from None
            raise APIError(503, f"{err}: every rank has died", type="server_error",
                           code="no_live_rank") from None
        stop_ids = () if gen.ignore_eos else tuple(self.tokenizer.eos_token_ids)
        request = Request(request_id, list(prompt), SamplingParams(
            max_new_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p,
            stop_token_ids=stop_ids, seed=seed))
        flight = Flight(request_id, group, len(prompt), gen.max_tokens, time.monotonic())
        if not self.ranks.send(group, Add(group, request)):
            raise APIError(503, f"DP group {group}'s rank is not reachable", type="server_error",
                           code="rank_unreachable")
        self.router.add(group, request_id, len(prompt), gen.max_tokens)
        self.flights[request_id] = flight
        return flight

    def cancel(self, flight: Flight, outcome: str = "cancelled") -> None:
        """The client went away (or a stop string ended it: ``outcome`` "ok"): free the rank's
        KV blocks. Nothing to do for a finished request."""
        if flight.done:
            return
        self._finish(flight, outcome)
        self.ranks.send(flight.group, Cancel(flight.group, flight.request_id))

    def _finish(self, flight: Flight, outcome: str) -> None:
        flight.done = True
        self.flights.pop(flight.request_id, None)
        self.router.remove(flight.group, flight.request_id)
        self.requests_total[outcome] += 1
        if outcome == "ok" and flight.first is not None:
            self.e2e.observe(flight.last - flight.arrived)
            if flight.generated > 1:
                self.tpot.observe((flight.last - flight.first) / (flight.generated - 1))

    async def tokens(self, flight: Flight):
        """(new token ids, finish reason or None) as the rank reports them; raises
        :class:`RankLost` when its rank dies. Steps that arrived while the client's side was
        busy come merged into one, so a loaded front end sends fewer, larger chunks instead of
        falling behind."""
        while True:
            kind, tokens, finish, error = await flight.events.get()
            while kind != "error" and finish is None and not flight.events.empty():
                kind, more, finish, error = flight.events.get_nowait()
                tokens = tokens + more
            if kind == "error":
                raise RankLost(error)
            yield tokens, finish
            if finish is not None:
                return

    # ------------------------------------------------------------------ from the ranks
    def _on_step(self, info: RankInfo, message: Step) -> None:
        now = time.monotonic()
        for event in message.events:
            request_id, tokens, finish, error = (event.request_id, event.tokens,
                                                 event.finish_reason, event.error)
            flight = self.flights.get(request_id)
            if flight is None:
                continue  # cancelled meanwhile
            if error is not None:
                self._finish(flight, "error")
                flight.events.put_nowait(("error", [], None, f"rank {info.rank} refused this "
                                          f"request: {error}"))
                continue
            if tokens:
                if flight.first is None:
                    flight.first = now
                    self.ttft.observe(now - flight.arrived)
                flight.last = now
                flight.generated += len(tokens)
                self.generation_tokens_total += len(tokens)
                self.tokens_by_group[flight.group] += len(tokens)
                self.router.progress(flight.group, request_id, len(tokens))
            if finish is not None:
                self._finish(flight, "ok")
            flight.events.put_nowait(("tokens", tokens, finish, None))

    def _on_lost(self, unit: Unit, why: str) -> None:
        """A group of ranks is down (a rank died; or its restarts failed): its requests fail
        with 503, the router stops using its DP groups; with no group left to serve or
        restart, the server fails."""
        if unit.state == "restarting":
            retry = "; it is restarting: retry"
        elif len(unit.dp_groups) < self.router.groups:
            retry = "; retry: the other DP groups keep serving"
        else:
            retry = ""
        for group in unit.dp_groups:
            for request_id in self.router.mark_dead(group):
                self._fail(request_id, f"the rank serving this request failed: {why}{retry}")
        if not any(self.router.live) and not self.ranks.restarting():
            what = (f"mapping {self.ranks.mapping} keeps collectives, so the whole group stops "
                    "with it" if unit.ranks == list(self.ranks.ranks) and
                    self.ranks.mapping.lockstep_size > 1 else "no rank is left to serve")
            self.fail_all(f"{why}; {what}")

    def _on_restored(self, unit: Unit) -> None:
        for group in unit.dp_groups:
            self.router.revive(group)

    def _fail(self, request_id: str, why: str) -> None:
        flight = self.flights.get(request_id)
        if flight is not None:
            self._finish(flight, "error")
            flight.events.put_nowait(("error", [], None, why))

    def fail_all(self, why: str) -> None:
        """Every request in flight gets an error; the server exits non-zero."""
        if self.failed is None:
            self.failed = why
            self.exit_code = 1
            print(f"adp serve: error: {why}; failing every request and exiting", flush=True,
                  file=sys.stderr)
        for request_id in list(self.flights):
            self._fail(request_id, f"the server is failing: {why}")
        self.stop_event.set()

    async def drain(self) -> None:
        """SIGTERM: take no new request, let those in flight finish for up to the shutdown
        timeout, then fail the rest."""
        self.draining = True
        deadline = time.monotonic() + self.shutdown_timeout_s
        while self.flights and time.monotonic() < deadline and not self.failed and \
                not self.forced:
            await asyncio.sleep(0.05)
        for request_id in list(self.flights):
            self._fail(request_id, "the server shut down before this request finished ("
                       + ("a second stop signal" if self.forced else
                          f"--shutdown-timeout {self.shutdown_timeout_s:g} s") + ")")
        await asyncio.sleep(0.2)  # let the handlers write their last bytes
        self.stop_event.set()

    # ------------------------------------------------------------------ reports
    def health(self) -> tuple[int, dict]:
        ranks = [{"rank": i.rank, "dp_rank": i.dp_rank, "state": i.state, "pid": i.pid,
                  "host": i.host, **({"error": i.error} if i.error else {})}
                 for i in self.ranks.ranks.values()]
        groups = [{"ranks": u.ranks, "dp_ranks": u.dp_groups, "state": u.state,
                   "restarts": u.restarts, **({"error": u.error} if u.error else {})}
                  for u in self.ranks.units]
        live = [g for g in range(self.router.groups) if self.router.live[g]]
        restarting = self.ranks.restarting()
        if self.failed or self.draining or not live:
            # No group serves now: "restarting" says one may again (a load balancer sends
            # elsewhere meanwhile).
            status = ("failed" if self.failed else "draining" if self.draining else
                      "restarting" if restarting else "no live rank")
            return 503, {"status": status, "live_dp_groups": live, "groups": groups,
                         "ranks": ranks}
        status = ("ok" if len(live) == self.router.groups else
                  "restarting" if restarting else "degraded")
        return 200, {"status": status, "live_dp_groups": live, "groups": groups, "ranks": ranks,
                     "model": self.limits.name, "mapping": str(self.ranks.mapping)}

    def metrics(self) -> str:
        groups = range(self.router.groups)
        per_rank = [i for i in self.ranks.ranks.values() if i.reports]

        def by_rank(key):
            return [({"rank": str(i.rank), "dp_rank": str(i.dp_rank)}, getattr(i.load, key))
                    for i in per_rank]

        lines = []
        lines += family("adp_requests_total", "counter", "Finished requests (one per choice) by "
                        "outcome", [({"outcome": k}, v) for k, v in self.requests_total.items()])
        lines += family("adp_prompt_tokens_total", "counter", "Prompt tokens accepted",
                        [({}, self.prompt_tokens_total)])
        lines += family("adp_generation_tokens_total", "counter", "Tokens generated",
                        [({}, self.generation_tokens_total)])
        lines += family("adp_requests_in_flight", "gauge", "Requests routed and not finished",
                        [({}, len(self.flights))])
        lines += self.ttft.render() + self.tpot.render() + self.e2e.render()
        lines += family("adp_rank_up", "gauge", "1 while a rank serves",
                        [({"rank": str(i.rank)}, float(i.state == "ready"))
                         for i in self.ranks.ranks.values()])
        by_group = [(u, {"dp_rank": str(g)}) for u in self.ranks.units for g in u.dp_groups]
        lines += family("adp_group_restarts_total", "counter", "Restarts of a DP group's ranks "
                        "after a failure that served again",
                        [(labels, u.restarts) for u, labels in by_group])
        lines += family("adp_group_restart_failures_total", "counter", "Restart attempts of a "
                        "DP group's ranks that did not serve",
                        [(labels, u.failed_starts) for u, labels in by_group])
        lines += family("adp_group_restarting", "gauge", "1 while a DP group's ranks restart",
                        [(labels, float(u.state == "restarting")) for u, labels in by_group])
        lines += family("adp_queue_depth", "gauge", "Requests waiting in a rank's engine",
                        by_rank("waiting"))
        lines += family("adp_running_requests", "gauge", "Requests a rank is decoding",
                        by_rank("running"))
        lines += family("adp_kv_blocks_used", "gauge", "KV-cache blocks in use per rank",
                        by_rank("kv_used"))
        lines += family("adp_kv_cache_usage_ratio", "gauge", "KV-cache blocks in use / total",
                        [({"rank": str(i.rank), "dp_rank": str(i.dp_rank)},
                          i.load.kv_used / max(i.load.kv_total, 1))
                         for i in per_rank])
        lines += family("adp_tokens_in_flight", "gauge", "Router load per DP group: prompt + "
                        "tokens still to generate of its requests in flight",
                        [({"dp_rank": str(g)}, self.router.tokens_in_flight(g)) for g in groups])
        lines += family("adp_routed_requests_total", "counter", "Requests routed per DP group",
                        [({"dp_rank": str(g)}, self.router.assigned_requests[g]) for g in groups])
        lines += family("adp_routed_tokens_total", "counter", "Prompt + max_tokens routed per "
                        "DP group", [({"dp_rank": str(g)}, self.router.assigned_tokens[g])
                                     for g in groups])
        lines += family("adp_generation_tokens_by_group_total", "counter", "Tokens generated "
                        "per DP group", [({"dp_rank": str(g)}, self.tokens_by_group[g])
                                         for g in groups])
        lines += family("adp_load_imbalance_ratio", "gauge", "Largest / mean tokens in flight "
                        "over the live DP groups (1 = even)", [({}, self.router.imbalance())])
        lines += family("adp_routed_imbalance_ratio", "gauge", "Largest / mean tokens routed "
                        "since start over the live DP groups", [({},
                                                                 self.router.assigned_imbalance())])
        return "\n".join(lines) + "\n"
