"""What runs next on a rank, and what a step produced: its requests from arrival to finish.

The scheduler holds the rank's requests (waiting, being prefilled, running), admits them while
the KV blocks of their whole length fit, turns a step's work into the runner's batches (plain
host data, their slots allocated in the cache: runtime/runner.py) and takes the tokens that
come back (:meth:`Scheduler.postprocess`): a stop token, ``max_new_tokens`` or the position
limit finishes a sequence and frees its blocks. Which calls a step makes (packed or padded, one
step ahead or in step, a lockstep group's agreed shapes) is the engine's (runtime/engine.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

import torch

from adp_pass.runtime.contract import Request, Result
from adp_pass.runtime.kv_cache import PagedKVCache
from adp_pass.runtime.runner import DecodeBatch, PackedBatch, PrefillBatch
from adp_pass.runtime.sampling import RowSampling, request_seed

# Prompts of different lengths are prefilled in one call while its padding (to the longest)
# stays under this fraction of the real tokens.
PREFILL_PADDING = 0.25


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_calls: int = 0
    prefill_s: float = 0.0
    # Packed prefill calls that also carried the running sequences' decode rows.
    mixed_calls: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    # Lockstep only: calls made with padding rows alone (another rank of the group had work),
    # their time, and the time spent agreeing on each step's shapes.
    idle_calls: int = 0
    idle_s: float = 0.0
    agree_s: float = 0.0
    # Time to first token: from add() to the first sampled token, summed over requests.
    ttft_s_sum: float = 0.0
    ttft_count: int = 0
    # Start-up only: the prompt path run before serving (RankEngine; CUDA).
    prompt_warmup_s: float = 0.0

    @property
    def mean_ttft_ms(self) -> float:
        return 1e3 * self.ttft_s_sum / max(self.ttft_count, 1)

    @property
    def mean_decode_step_ms(self) -> float:
        return 1e3 * self.decode_s / max(self.decode_steps, 1)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


@dataclass
class Sequence:
    """A running request: the tokens it generated."""

    request: Request
    generated: list[int] = field(default_factory=list)
    # Decode steps launched for this sequence whose token is not read yet (0 or 1 between
    # steps; 2 while the next step is launched before the one in flight is read).
    pending: int = 0


@dataclass
class Prefill:
    """A prompt being prefilled in chunks: ``done`` of its tokens are in the cache."""

    request: Request
    done: int = 0


class Scheduler:
    """The rank's requests and their KV blocks; ``stats`` gets each request's time to first
    token. ``seed`` seeds the draws of requests without a seed of their own."""

    def __init__(self, cache: PagedKVCache, stats: EngineStats, *, max_batch: int,
                 max_prefill_tokens: int, max_position: int | None, seed: int) -> None:
        self.cache = cache
        self.stats = stats
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.max_position = max_position
        self.waiting: deque[Request] = deque()
        self.running: dict[Hashable, Sequence] = {}
        self.prefilling: list[Prefill] = []
        self._arrival: dict[Hashable, float] = {}
        # Each request samples with one seed (runtime/sampling.py): its own SamplingParams.seed,
        # else one drawn here, on the host, so that drawing never waits for the GPU.
        self._seed_source = torch.Generator().manual_seed(seed)
        self._seeds: dict[Hashable, int] = {}

    # ------------------------------------------------------------------ arrival and cancel
    def add(self, request: Request) -> None:
        needed = self.cache.blocks_for(len(request.prompt) + request.params.max_new_tokens)
        if needed > self.cache.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} needs {needed} KV blocks (prompt "
                f"{len(request.prompt)} + {request.params.max_new_tokens} new tokens) but the "
                f"cache has {self.cache.num_blocks}; raise num_blocks or shorten the request"
            )
        if not request.prompt:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        self._arrival[request.request_id] = time.perf_counter()
        self._seeds[request.request_id] = request_seed(request.params, self._seed_source)
        self.waiting.append(request)

    def cancel(self, request_id: Hashable) -> bool:
        """Drop a waiting or running request and free its KV blocks; False if it is not here."""
        self._arrival.pop(request_id, None)
        self._seeds.pop(request_id, None)
        if request_id in self.running:
            del self.running[request_id]
            self.cache.free(request_id)
            return True
        for item in self.prefilling:
            if item.request.request_id == request_id:
                self.prefilling.remove(item)
                if item.done:
                    self.cache.free(request_id)
                return True
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    # ------------------------------------------------------------------ what runs next
    def admit(self) -> list[Request]:
        """Waiting requests (taken off the queue, in order) to prefill in one padded call.

        Prompts of different lengths share the call, right-padded to the longest, while the
        padding stays under ``PREFILL_PADDING`` of the real tokens (a short prompt behind a long
        one waits for the next step rather than costing a long one's compute)."""
        group: list[Request] = []
        budget = self.cache.num_free_blocks - self._blocks_still_needed()
        longest = real = 0
        while self.waiting and len(self.running) + len(group) < self.max_batch:
            request = self.waiting[0]
            length = len(request.prompt)
            padded = max(longest, length) * (len(group) + 1)
            if group and (padded > self.max_prefill_tokens
                          or padded > (1 + PREFILL_PADDING) * (real + length)):
                break
            need = self.cache.blocks_for(length + request.params.max_new_tokens)
            if need > budget:
                break
            budget -= need
            longest, real = max(longest, length), real + length
            group.append(self.waiting.popleft())
        return group

    def schedule_chunks(self) -> list[tuple[Prefill, int]]:
        """This step's prompt work: ``(prompt, tokens to run)``, prompts already in progress
        first, then waiting requests admitted while the step's token budget, the batch and the
        KV blocks (each request's whole length, reserved up front) allow."""
        budget = self.max_prefill_tokens
        chunks = []
        for item in self.prefilling:
            take = min(len(item.request.prompt) - item.done, budget)
            if take <= 0:
                break
            chunks.append((item, take))
            budget -= take
        free = self.cache.num_free_blocks - self._blocks_still_needed()
        while (self.waiting and budget > 0
               and len(self.running) + len(self.prefilling) < self.max_batch):
            request = self.waiting[0]
            need = self.cache.blocks_for(len(request.prompt) + request.params.max_new_tokens)
            if need > free:
                break
            free -= need
            item = Prefill(self.waiting.popleft())
            self.prefilling.append(item)
            take = min(len(request.prompt), budget)
            chunks.append((item, take))
            budget -= take
        return chunks

    def _blocks_still_needed(self) -> int:
        """Blocks the running sequences will take before they finish (reserved up front, so a
        running sequence never runs out of cache mid-generation)."""
        total = 0
        for request in [s.request for s in self.running.values()] + [
                p.request for p in self.prefilling]:
            final = len(request.prompt) + request.params.max_new_tokens
            held = len(self.cache.block_table(request.request_id)) \
                if self.cache.holds(request.request_id) else 0
            total += self.cache.blocks_for(final) - held
        return total

    def to_decode(self) -> list[Sequence]:
        """The running sequences a decode step launches: all but those whose token in flight
        is certain to end them (length or position limit)."""
        return [seq for seq in self.running.values()
                if not (seq.pending and self._limit(seq, len(seq.generated) + seq.pending))]

    # ------------------------------------------------------------------ batches
    def prefill_batch(self, group: list[Request], rows: int | None = None,
                      length: int | None = None) -> PrefillBatch:
        """The padded prefill of ``group`` (its slots allocated), right-padded to its longest
        prompt; a lockstep group's agreed ``[rows, length]`` adds padding rows."""
        slots = [self.cache.allocate(r.request_id, len(r.prompt)) for r in group]
        return PrefillBatch(
            [r.prompt for r in group], slots, [self.cache.block_table(r.request_id) for r in group],
            len(group) if rows is None else rows,
            max(len(r.prompt) for r in group) if length is None else length,
            self._sampling(group, [0] * len(group)))

    def packed_batch(self, chunks: list[tuple[Prefill, int]],
                     decoding: list[Sequence]) -> tuple[PackedBatch, list[Request]]:
        """The packed call of ``chunks`` (their slots allocated) and of ``decoding``'s decode
        rows, and the prompts whose last chunk it runs (off ``prefilling``: they start running
        with the call's tokens)."""
        ids, positions, slots, tables, lens, starts = [], [], [], [], [], [0]
        for item, take in chunks:
            rid = item.request.request_id
            new = self.cache.allocate(rid, take) if not item.done else self.cache.append(rid, take)
            ids += item.request.prompt[item.done:item.done + take]
            positions += range(item.done, item.done + take)
            slots += new
            item.done += take
            tables.append(self.cache.block_table(rid))
            lens.append(item.done)
            starts.append(starts[-1] + take)
        decode_slots, decode_lens, decode_tables = self._grow_by_one(decoding)
        ids += [seq.generated[-1] for seq in decoding]
        positions += [n - 1 for n in decode_lens]
        slots += decode_slots
        tables += decode_tables
        lens += decode_lens
        starts += range(starts[-1] + 1, starts[-1] + 1 + len(decoding))
        # Rows to sample (each sequence's last token): every prompt whose last chunk ran, then
        # every decode row. A prompt's first token is its token 0; a decode row's its next one.
        ending = [i for i, (item, _) in enumerate(chunks) if item.done == len(item.request.prompt)]
        for i in ending:
            self.prefilling.remove(chunks[i][0])
        ended = [chunks[i][0].request for i in ending]
        rows = [starts[i + 1] - 1 for i in [*ending, *range(len(chunks), len(starts) - 1)]]
        sampling = self._sampling(ended + [seq.request for seq in decoding],
                                  [0] * len(ended) + [len(seq.generated) for seq in decoding])
        return PackedBatch(ids, positions, slots, tables, lens, starts, rows, sampling), ended

    def decode_batch(self, seqs: list[Sequence], previous: list[Sequence],
                     rows: int | None = None) -> DecodeBatch:
        """The decode step of ``seqs`` (a new slot each), padding rows up to ``rows``. A
        sequence whose token is in flight takes it on the device, from its row of the step
        launched before (``previous``, in row order); the others pass their last token. Slots
        and block tables depend only on lengths: they are known before the token in flight."""
        rows_before = {id(seq): row for row, seq in enumerate(previous)}
        slots, lens, tables = self._grow_by_one(seqs)
        return DecodeBatch(
            tokens=[0 if seq.pending else seq.generated[-1] for seq in seqs],
            source=[rows_before[id(seq)] if seq.pending else -1 for seq in seqs],
            slots=slots, tables=tables, context_lens=lens,
            # A row whose token is in flight generates the one after it.
            sampling=self._sampling([seq.request for seq in seqs],
                                    [len(seq.generated) + seq.pending for seq in seqs]),
            rows=len(seqs) if rows is None else rows)

    def _grow_by_one(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[list[int]]]:
        """A decode row for each sequence: its new slot, its context length with it, its block
        table."""
        ids = [seq.request.request_id for seq in seqs]
        slots = [self.cache.append(i, 1)[0] for i in ids]
        return slots, [self.cache.context_len(i) for i in ids], [self.cache.block_table(i)
                                                                 for i in ids]

    def _sampling(self, requests: list[Request], counters: list[int]) -> RowSampling:
        """The sampling inputs of a call's rows, one per request; ``counters``: the index of the
        token each row generates."""
        return RowSampling.of([r.params for r in requests],
                              [self._seeds[r.request_id] for r in requests], counters)

    # ------------------------------------------------------------------ what a step produced
    def postprocess(self, started: list[Request], seqs: list[Sequence],
                    tokens: list[int]) -> list[Result]:
        """Take a call's tokens: the first of each of ``started`` (prompts whose prefill ended;
        their sequences run from now), then the next of each of ``seqs``. The requests that
        finished: a stop token or a limit ends a sequence and frees its blocks."""
        finished = []
        for request, token in zip(started, tokens):
            seq = Sequence(request)
            self.running[request.request_id] = seq
            finished += self._accept(seq, token)
        for seq, token in zip(seqs, tokens[len(started):]):
            finished += self._accept(seq, token)
        return finished

    def read_back(self, seqs: list[Sequence], tokens: list[int]
                  ) -> tuple[list[Sequence], list[int]]:
        """A launched step's tokens are read: the rows of sequences still running, with their
        tokens; rows of sequences that ended since the launch (a stop token read after it) or
        were cancelled are dropped."""
        kept = []
        for seq, token in zip(seqs, tokens):
            seq.pending -= 1
            if self.running.get(seq.request.request_id) is seq:
                kept.append((seq, token))
        return [seq for seq, _ in kept], [token for _, token in kept]

    def _accept(self, seq: Sequence, token: int) -> list[Result]:
        if not seq.generated:
            arrived = self._arrival.pop(seq.request.request_id, None)
            if arrived is not None:
                self.stats.ttft_s_sum += time.perf_counter() - arrived
                self.stats.ttft_count += 1
        seq.generated.append(token)
        params = seq.request.params
        reason = "stop" if token in params.stop_token_ids else self._limit(seq, len(seq.generated))
        if reason is None:
            return []
        request_id = seq.request.request_id
        del self.running[request_id]
        self.cache.free(request_id)
        self._seeds.pop(request_id, None)
        return [Result(request_id, len(seq.request.prompt), seq.generated, reason)]

    def _limit(self, seq: Sequence, generated: int) -> str | None:
        """The limit ``seq`` reaches with ``generated`` tokens: "length", "max_position" or
        None."""
        if generated >= seq.request.params.max_new_tokens:
            return "length"
        if (self.max_position is not None
                and len(seq.request.prompt) + generated >= self.max_position):
            return "max_position"
        return None
