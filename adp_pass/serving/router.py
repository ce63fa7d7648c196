"""Which DP group serves a new request: the live one with the fewest tokens in flight.

A request's load is its prompt plus the tokens it may still generate (``max_tokens`` minus
those already out), counted from the moment it is routed until it finishes, queued or running:
a group busy with long generations stops drawing new requests until it catches up, so long and
short requests even out (what ``frontend.assign_by_load`` does for an offline batch, kept up to
date as tokens arrive). A group whose queue (requests routed to it that have no token yet) is
full takes no more; when every live group is full the server answers 429 with Retry-After.
"""

from __future__ import annotations

from dataclasses import dataclass


class Overloaded(Exception):
    """Every live DP group's queue is full."""


class NoLiveRank(Exception):
    """No DP group is left to serve."""


@dataclass
class Load:
    prompt: int
    max_tokens: int
    generated: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt + self.max_tokens - self.generated


class Router:
    def __init__(self, groups: int, max_queue: int) -> None:
        self.groups, self.max_queue = groups, max_queue
        self.live = [True] * groups
        self.flights: list[dict[str, Load]] = [{} for _ in range(groups)]
        self.assigned_requests = [0] * groups
        self.assigned_tokens = [0] * groups

    def tokens_in_flight(self, group: int) -> int:
        return sum(load.tokens for load in self.flights[group].values())

    def queued(self, group: int) -> int:
        return sum(1 for load in self.flights[group].values() if load.generated == 0)

    def pick(self, prompt: int, max_tokens: int) -> int:
        """The group for a new request (not yet recorded: :meth:`add` does that)."""
        live = [g for g in range(self.groups) if self.live[g]]
        if not live:
            raise NoLiveRank("no rank is left to serve requests")
        open_ = [g for g in live if self.queued(g) < self.max_queue]
        if not open_:
            raise Overloaded(f"every rank's queue is full ({self.max_queue} waiting requests "
                             "each)")
        # Ties (an idle server) go to the group given the fewest tokens so far, so requests
        # that come one at a time still spread over the ranks.
        return min(open_, key=lambda g: (self.tokens_in_flight(g), self.assigned_tokens[g], g))

    def add(self, group: int, request_id: str, prompt: int, max_tokens: int) -> None:
        self.flights[group][request_id] = Load(prompt, max_tokens)
        self.assigned_requests[group] += 1
        self.assigned_tokens[group] += prompt + max_tokens

    def progress(self, group: int, request_id: str, tokens: int) -> None:
        load = self.flights[group].get(request_id)
        if load is not None:
            load.generated += tokens

    def remove(self, group: int, request_id: str) -> None:
        self.flights[group].pop(request_id, None)

    def mark_dead(self, group: int) -> list[str]:
        """Stop routing to ``group``; returns the requests it held."""
        self.live[group] = False
        lost = list(self.flights[group])
        self.flights[group].clear()
        return lost

    def revive(self, group: int) -> None:
        """``group`` serves again (its ranks were restarted), with nothing in flight."""
        self.live[group] = True

    def imbalance(self) -> float:
        """Largest over mean tokens in flight across the live groups (1.0: even, or idle)."""
        loads = [self.tokens_in_flight(g) for g in range(self.groups) if self.live[g]]
        return _ratio(loads)

    def assigned_imbalance(self) -> float:
        """The same over every token routed since start (prompt + max_tokens)."""
        return _ratio([self.assigned_tokens[g] for g in range(self.groups) if self.live[g]])


def _ratio(values: list[int]) -> float:
    if not values or not any(values):
        return 1.0
    return max(values) / (sum(values) / len(values))
