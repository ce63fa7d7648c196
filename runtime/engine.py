"""One rank's engine: continuous batching over the rank's own requests.

The model is the rank's rewritten, lowered, cache-inserted graph:
``model(input_ids [B,S], positions [B,S], slot_mapping [B*S], block_tables [B,M],
context_lens [B]) -> (logits [B,S,V],)``. Under attention-DP with a replicated MLP the graph
holds no collective, so a rank steps on its own: it never waits for another rank.

Each step admits waiting requests whose KV blocks fit and prefills them, then runs one decode
step for every running sequence. A graph that takes ``query_start_loc`` (every graph the cache
insertion builds) prefills *packed*: the step's prompts back to back in one row, no padding,
a prompt longer than the step's token budget (``max_prefill_tokens``) split into chunks over
several steps, and the running sequences' decode rows in the same call (``_packed_step``).
Otherwise (a lockstep group, a model without it) prompts of different lengths share a call,
right-padded to the longest, while the padding stays under ``PREFILL_PADDING`` of their
tokens. A graph that takes ``logits_indices`` (the cache insertion adds it where it finds the LM
head) computes prefill logits only for the rows that are sampled: each finished prompt's last
token and the decode rows. On a GPU the decode step is
replayed from CUDA graphs captured for a set of batch sizes.

Decoding runs one step ahead of the host (``async_decode``): step t+1 is launched before
step t's tokens are read, its input tokens taken on the device from step t's tokens, so the
host's work of a step (bookkeeping, block tables, the copy of the inputs) overlaps the GPU's
step instead of sitting between two steps. Sampled rows run ahead too: a token's draw is keyed
by the request's seed and the token's index (runtime/sampling.py), not by generator state the
host advances, and it is taken inside the step's CUDA graphs. A sequence whose last token is
certain to end it (its length limit) is not launched again; one that ends on a stop token
wastes one row of the step in flight, whose token is dropped (docs/runtime.md, "Decoding one
step ahead").

With a :class:`~adp_pass.runtime.lockstep.Lockstep` (mappings whose graph holds collectives:
a sharded MLP, attention TP, the plain TP job), the ranks of a lockstep group agree on each
step's shapes first and every rank makes the same calls, padded to the group's largest batch
(``_lockstep_step``; docs/runtime.md, "Lockstep stepping").
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

import torch

from adp_pass.runtime.kv_cache import PagedKVCache
from adp_pass.runtime.lockstep import Lockstep
from adp_pass.runtime.sampling import (RowSampling, SamplingParams, choose_tokens, request_seed,
                                       sample)
from adp_pass.runtime.sampling import greedy as greedy_tokens


# Prompts of different lengths are prefilled in one call while its padding (to the longest)
# stays under this fraction of the real tokens.
PREFILL_PADDING = 0.25


@dataclass
class Request:
    request_id: Hashable
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Result:
    request_id: Hashable
    prompt_len: int
    tokens: list[int]
    finish_reason: str  # "length" | "stop" | "max_position"


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
class _Sequence:
    request: Request
    generated: list[int] = field(default_factory=list)
    # Decode steps launched for this sequence whose token is not read yet (0 or 1 between
    # steps; 2 while the next step is launched before the one in flight is read).
    pending: int = 0


@dataclass
class _Prefill:
    """A prompt being prefilled in chunks: ``done`` of its tokens are in the cache."""

    request: Request
    done: int = 0


@dataclass
class _Launched:
    """A decode step launched and not yet read: its sequences in row order, and where its
    tokens arrive on the host (``ready`` is recorded after their copy)."""

    seqs: list[_Sequence]
    tokens: torch.Tensor
    ready: torch.cuda.Event | None


class RankEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        *,
        max_batch: int = 64,
        max_prefill_tokens: int = 8192,
        max_position: int | None = None,
        max_seq_len: int | None = None,
        cuda_graph_sizes: tuple[int, ...] | None = None,
        seed: int = 0,
        lockstep: Lockstep | None = None,
        async_decode: bool = True,
        packed_prefill: bool | None = None,
        mix_decode: bool = True,
    ) -> None:
        self.model = model
        self.lockstep = lockstep
        self._group_done = False  # lockstep: the last step found no work on any rank
        self.cache = cache
        self.device = cache.device
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.max_position = max_position
        # Block-table width of a captured decode graph: the longest sequence it must serve.
        self.max_blocks = cache.blocks_for(max_seq_len) if max_seq_len else cache.num_blocks
        self.waiting: deque[Request] = deque()
        self.running: dict[Hashable, _Sequence] = {}
        self.stats = EngineStats()
        self._arrival: dict[Hashable, float] = {}
        # Each request samples with one seed (runtime/sampling.py): its own SamplingParams.seed,
        # else one drawn here, on the host, so that drawing never waits for the GPU.
        self._seed_source = torch.Generator().manual_seed(seed)
        self._seeds: dict[Hashable, int] = {}
        # Lockstep groups agree on every step's shapes first: they decode in step with the host.
        self.async_decode = async_decode and lockstep is None
        # Packed prefill needs a graph that takes query_start_loc; a lockstep group pads
        # every rank's call to one [rows, length] instead.
        takes_packed = _takes_input(model, "query_start_loc")
        if packed_prefill and (not takes_packed or lockstep is not None):
            raise ValueError("packed prefill needs a model that takes query_start_loc and no "
                             "lockstep group")
        self.packed = takes_packed and lockstep is None if packed_prefill is None \
            else packed_prefill
        self.mix_decode = mix_decode
        # Prefill calls ask for the logits rows they sample only (the LM head over every prompt
        # token is a chunk's largest GEMM and its largest tensor); decode calls need every row.
        self.selects_logits = _takes_input(model, "logits_indices")
        self.prefilling: list[_Prefill] = []
        self._inflight: _Launched | None = None
        # The last decode step's token per row: the next step's input for the rows
        # whose token the host has not read yet (``async_decode``).
        rows = max([max_batch, *(cuda_graph_sizes or ())])
        self._last_tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        # Host copies of launched steps' tokens: two, alternating, so a launched step's copy never
        # lands on the buffer of the step in flight before it (read after this launch).
        self._token_buffers = [torch.zeros(rows, dtype=torch.long) for _ in range(2)]
        if self.device.type == "cuda":
            self._token_buffers = [b.pin_memory() for b in self._token_buffers]
        self._launches = 0
        self._graphs = None
        if cuda_graph_sizes and self.device.type == "cuda":
            self._graphs = _DecodeGraphs(self, sorted(cuda_graph_sizes))

    # ------------------------------------------------------------------ public
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
        """Drop a waiting or running request and free its KV blocks (a client that went away);
        False if it is not here (already finished). Safe between steps; with lockstep, every
        rank of the group must cancel at the same step (the online server broadcasts it)."""
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

    def partial_tokens(self) -> dict[Hashable, list[int]]:
        """The tokens each running request has generated so far (streaming reads them after
        every step; finished requests come back from :meth:`step` as results)."""
        return {rid: seq.generated for rid, seq in self.running.items()}

    @property
    def has_work(self) -> bool:
        """This rank has requests waiting or running."""
        return bool(self.waiting or self.running or self.prefilling)

    @property
    def active(self) -> bool:
        """Keep calling :meth:`step`: while this rank has work, or with lockstep, until a step
        found no work on any rank of the group (a rank without requests of its own must still
        make the group's calls)."""
        return not self._group_done if self.lockstep is not None else self.has_work

    def generate(self, requests: list[Request]) -> list[Result]:
        """Serve ``requests`` to the end; results in request order. Collective with lockstep:
        every rank of the group calls it (with its own requests, possibly none)."""
        for request in requests:
            self.add(request)
        results = self.run_until_done()
        order = {r.request_id: i for i, r in enumerate(requests)}
        return sorted(results, key=lambda r: order[r.request_id])

    def begin(self) -> None:
        """Start a round of serving: with lockstep, :attr:`active` stays true until a step
        finds the whole group idle again (call it on every rank of the group, with or without
        requests of its own)."""
        self._group_done = False

    def run_until_done(self) -> list[Result]:
        """Step until :attr:`active` is false; results in finishing order."""
        self.begin()
        results: list[Result] = []
        while self.active:
            results += self.step()
        return results

    def step(self) -> list[Result]:
        if self.lockstep is not None:
            return self._lockstep_step()
        if self.packed:
            return self._packed_step()
        group = self._admit()
        finished = self._prefill(group) if group else []
        if self.running or self._inflight is not None:
            finished += self._decode()
        return finished

    def _lockstep_step(self) -> list[Result]:
        """One step of the lockstep group: agree on ``[prefill rows, prompt length, decode rows,
        has work]`` (elementwise max), then every rank makes the same calls: one prefill of
        ``[rows, length]`` if any rank admits a prompt, one decode of ``[rows, 1]`` if any rank
        decodes, its own rows first and padding rows after."""
        work = self.has_work
        group = self._admit()
        # Decode rows are bounded before the prefill samples: a prompt that finishes at its
        # first token leaves a padding row instead.
        decode_bound = len(self.running) + len(group)
        start = time.perf_counter()
        prefill_rows, length, decode_rows, any_work = self.lockstep.agree(
            [len(group), max((len(r.prompt) for r in group), default=0), decode_bound, int(work)]
        )
        self.stats.agree_s += time.perf_counter() - start
        if not any_work:
            self._group_done = True
            return []
        if not prefill_rows and not decode_rows:
            raise RuntimeError("lockstep: a rank has work but no rank of the group can admit or "
                               "decode anything (max_batch 0?)")
        finished = self._prefill(group, prefill_rows, length) if prefill_rows else []
        if decode_rows:
            finished += self._decode(decode_rows)
        return finished

    def prefill_logits(self, prompt: list[int] | None) -> torch.Tensor | None:
        """Next-token logits [V] of ``prompt`` from one prefill call that writes nothing to the
        cache (every slot -1): a check of the model, not serving. Collective with lockstep:
        every rank of the group calls it, ``None`` for a rank without a prompt."""
        rows, length = (1, len(prompt)) if prompt else (0, 0)
        if self.lockstep is not None:
            rows, length = self.lockstep.agree([rows, length])
        if not rows:
            return None
        prompts = [prompt] if prompt else []
        slots = [[-1] * len(p) for p in prompts]
        inputs, last = prefill_batch(prompts, slots, [[]] * len(prompts), rows, length,
                                     self.device)
        with torch.no_grad():
            if self.selects_logits:  # the prompt's last position alone (none: padding rows)
                logits = self._logits_at(inputs, [len(p) - 1 for p in prompts])
                return logits[0, 0] if prompt else None
            logits = self.model(*inputs)[0]
        return logits[0, last[0]] if prompt else None

    # ------------------------------------------------------------------ packed prefill
    def _packed_step(self) -> list[Result]:
        """Prefill chunks (and, with ``mix_decode``, every running sequence's decode row) in
        one packed call; a step without prompt work decodes as usual (CUDA graphs, one step
        ahead)."""
        chunks = self._schedule_chunks()
        if not chunks:
            return self._decode() if self.running or self._inflight is not None else []
        finished = []
        if self._inflight is not None:  # the decode rows below need their tokens on the host
            finished += self._collect(self._inflight)
            self._inflight = None
        decoding = list(self.running.values()) if self.mix_decode else []
        start = time.perf_counter()
        ids, positions, slots, tables, lens, starts = [], [], [], [], [], [0]
        for item, take in chunks:
            request = item.request
            rid = request.request_id
            new = (self.cache.allocate(rid, take) if not item.done
                   else self.cache.append(rid, take))
            ids += request.prompt[item.done:item.done + take]
            positions += range(item.done, item.done + take)
            slots += new
            item.done += take
            tables.append(self.cache.block_table(rid))
            lens.append(item.done)
            starts.append(starts[-1] + take)
        decode_slots, decode_lens, decode_tables = self._grow_by_one(
            [seq.request.request_id for seq in decoding])
        ids += [seq.generated[-1] for seq in decoding]
        positions += [n - 1 for n in decode_lens]
        slots += decode_slots
        tables += decode_tables
        lens += decode_lens
        starts += range(starts[-1] + 1, starts[-1] + 1 + len(decoding))
        inputs = packed_batch(ids, positions, slots, tables, lens, starts, self.device)
        # Rows to sample (each sequence's last token): every prompt whose last chunk ran, then
        # every decode row.
        ended = [i for i, (item, _) in enumerate(chunks) if item.done == len(item.request.prompt)]
        done = [chunks[i][0] for i in ended]
        rows = [starts[i + 1] - 1 for i in [*ended, *range(len(chunks), len(starts) - 1)]]
        requests = [item.request for item in done] + [seq.request for seq in decoding]
        tokens = []
        with torch.no_grad():
            if self.selects_logits:  # those rows alone; none for a chunk that ends no prompt
                picked = self._logits_at(inputs, rows)[0]
            else:
                logits = self.model(*inputs)[0][0]
                picked = logits[torch.tensor(rows, device=self.device)] if rows else None
        if rows:  # a prompt's first token is its token 0; a decode row's is its next one
            counters = [0] * len(done) + [len(seq.generated) for seq in decoding]
            tokens = sample(picked, self._sampling(requests, counters)).tolist()
        elapsed = time.perf_counter() - start
        self.stats.prefill_tokens += sum(take for _, take in chunks)
        self.stats.prefill_calls += 1
        self.stats.prefill_s += elapsed
        if decoding:
            self.stats.mixed_calls += 1
            self.stats.decode_tokens += len(decoding)
        for item in done:
            self.prefilling.remove(item)
        for item, token in zip(done, tokens):
            finished += self._start(item.request, token)
        for seq, token in zip(decoding, tokens[len(done):]):
            finished += self._accept(seq, token)
        if self.running and not self.mix_decode:
            finished += self._decode()  # the decode step after the prefill, in its own call
        return finished

    def _schedule_chunks(self) -> list[tuple[_Prefill, int]]:
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
            item = _Prefill(self.waiting.popleft())
            self.prefilling.append(item)
            take = min(len(request.prompt), budget)
            chunks.append((item, take))
            budget -= take
        return chunks

    # ------------------------------------------------------------------ scheduling
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

    def _admit(self) -> list[Request]:
        """Waiting requests (taken off the queue, in order) to prefill in this step's one call.

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

    def _prefill(self, group: list[Request], rows: int | None = None,
                 length: int | None = None) -> list[Result]:
        """One prefill call for ``group`` (prompts of one length). Lockstep passes the agreed
        ``[rows, length]``: prompts right-padded, padding rows after (``prefill_batch``)."""
        start = time.perf_counter()
        rows = len(group) if rows is None else rows
        length = max(len(r.prompt) for r in group) if length is None else length
        slots = [self.cache.allocate(r.request_id, len(r.prompt)) for r in group]
        tables = [self.cache.block_table(r.request_id) for r in group]
        inputs, last = prefill_batch([r.prompt for r in group], slots, tables, rows, length,
                                     self.device)
        with torch.no_grad():
            if self.selects_logits:
                # The graph selects positions of every row: the prompts' distinct last positions
                # (rows x at most len(group) logits rows instead of rows x length).
                wanted = sorted({len(r.prompt) - 1 for r in group})
                logits = self._logits_at(inputs, wanted)
                column = {position: i for i, position in enumerate(wanted)}
                last = torch.tensor([column[len(r.prompt) - 1] for r in group],
                                    dtype=torch.long).to(self.device)
            else:
                logits = self.model(*inputs)[0]
        if not group:  # padding rows only: the call was for the other ranks' prompts
            self.stats.idle_calls += 1
            self.stats.idle_s += time.perf_counter() - start
            return []
        logits = logits[torch.arange(len(group), device=self.device), last]
        tokens = sample(logits, self._sampling(group, [0] * len(group))).tolist()
        self.stats.prefill_tokens += sum(len(r.prompt) for r in group)
        self.stats.prefill_calls += 1
        self.stats.prefill_s += time.perf_counter() - start
        finished = []
        for request, token in zip(group, tokens):
            finished += self._start(request, token)
        return finished

    def _logits_at(self, inputs: tuple[torch.Tensor, ...], positions: list[int]) -> torch.Tensor:
        """The model's logits ``[B, len(positions), V]`` at these positions of the sequence dim
        (a packed call: its token rows) only. ``positions`` may be empty: no LM head work."""
        index = torch.tensor(positions, dtype=torch.long).to(self.device)
        return self.model(*inputs, logits_indices=index)[0]

    def _start(self, request: Request, token: int) -> list[Result]:
        """A prompt's first token: its sequence runs from now (or ends already)."""
        seq = _Sequence(request)
        self.running[request.request_id] = seq
        return self._accept(seq, token)

    def _decode(self, rows: int | None = None) -> list[Result]:
        """One decode call for every running sequence; lockstep passes the agreed ``rows``
        (padding rows after the sequences: slot -1, context_len 0)."""
        if self.async_decode:
            return self._decode_ahead()
        finished = self._collect(self._inflight) if self._inflight is not None else []
        self._inflight = None
        if not self.running and rows is None:
            return finished
        return finished + self._decode_in_step(rows)

    def _sampling(self, requests: list[Request], counters: list[int]) -> RowSampling:
        """The sampling inputs of a call's rows, one per request; ``counters``: the index of the
        token each row generates."""
        return RowSampling.of([r.params for r in requests],
                              [self._seeds[r.request_id] for r in requests], counters)

    def _decode_ahead(self) -> list[Result]:
        """Launch the next decode step, then read the one in flight."""
        start = time.perf_counter()
        previous = self._inflight
        launch = [s for s in self.running.values() if not self._ends_with_pending(s)]
        self._inflight = self._launch(launch, previous) if launch else None
        finished = self._collect(previous) if previous is not None else []
        self.stats.decode_s += time.perf_counter() - start
        return finished

    def _ends_with_pending(self, seq: _Sequence) -> bool:
        """The token in flight is certain to end ``seq`` (length or position limit)."""
        return bool(seq.pending) and self._limit(seq, len(seq.generated) + seq.pending) is not None

    def _limit(self, seq: _Sequence, generated: int) -> str | None:
        """The limit ``seq`` reaches with ``generated`` tokens: "length", "max_position" or
        None."""
        if generated >= seq.request.params.max_new_tokens:
            return "length"
        if (self.max_position is not None
                and len(seq.request.prompt) + generated >= self.max_position):
            return "max_position"
        return None

    def _launch(self, seqs: list[_Sequence], previous: _Launched | None) -> _Launched:
        """Enqueue one decode step for ``seqs`` without waiting for it. A sequence whose token
        is in flight reads it on the device (its row of the previous step); the others pass
        their last token from the host."""
        rows_before = {id(seq): row for row, seq in enumerate(previous.seqs)} if previous else {}
        source = [rows_before[id(seq)] if seq.pending else -1 for seq in seqs]
        tokens = [0 if seq.pending else seq.generated[-1] for seq in seqs]
        slots, lens, tables = self._grow_by_one([seq.request.request_id for seq in seqs])
        positions = [n - 1 for n in lens]
        # A row whose token is in flight generates the one after it.
        rows = self._sampling([seq.request for seq in seqs],
                              [len(seq.generated) + seq.pending for seq in seqs])
        with torch.no_grad():
            if self._graphs is not None and self._graphs.fits(len(seqs)):
                _, chosen = self._graphs.run_host(tokens, positions, slots, tables, lens,
                                                  len(seqs), source=source, sampling=rows)
            else:
                inputs = decode_batch(tokens, positions, slots, tables, lens, len(seqs),
                                      self.device)
                inputs = (self._tokens_from(source, inputs[0]), *inputs[1:])
                chosen = sample(self.model(*inputs)[0][:, -1], rows)
                self._last_tokens[: len(seqs)] = chosen
        self._launches += 1
        host = self._token_buffers[self._launches % 2][: len(seqs)]
        ready = None
        if self.device.type == "cuda":
            host.copy_(chosen[: len(seqs)], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host.copy_(chosen[: len(seqs)])
        for seq in seqs:
            seq.pending += 1
        return _Launched(seqs, host, ready)

    def _grow_by_one(self, ids: list[Hashable]) -> tuple[list[int], list[int], list[list[int]]]:
        """A decode row for each sequence: its new slot, its context length with it, its block
        table."""
        slots = [self.cache.append(i, 1)[0] for i in ids]
        return slots, [self.cache.context_len(i) for i in ids], [self.cache.block_table(i)
                                                                 for i in ids]

    def _tokens_from(self, source: list[int], host_ids: torch.Tensor) -> torch.Tensor:
        """Input ids ``[rows, 1]``: row i reads the previous step's token of row ``source[i]``
        where that is >= 0, else ``host_ids``."""
        src = torch.tensor(source, dtype=torch.long).to(self.device).view(-1, 1)
        return torch.where(src >= 0, self._last_tokens[src.clamp(min=0)], host_ids)

    def _collect(self, launched: _Launched) -> list[Result]:
        """Wait for a launched step and take its tokens; rows of sequences that ended (on a
        stop token read since the launch) or were cancelled are dropped."""
        if launched.ready is not None:
            launched.ready.synchronize()
        tokens = launched.tokens.tolist()
        finished, taken = [], 0
        for seq, token in zip(launched.seqs, tokens):
            seq.pending -= 1
            if self.running.get(seq.request.request_id) is not seq:
                continue
            taken += 1
            finished += self._accept(seq, token)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += taken
        return finished

    def _decode_in_step(self, rows: int | None) -> list[Result]:
        start = time.perf_counter()
        seqs = list(self.running.values())
        ids = [s.request.request_id for s in seqs]
        rows = len(seqs) if rows is None else rows
        slots, lens, tables = self._grow_by_one(ids)
        last = [s.generated[-1] for s in seqs]
        sampling = self._sampling([s.request for s in seqs], [len(s.generated) for s in seqs])
        chosen = None  # each row's token, when a graph ran (the choice is in the graph)
        with torch.no_grad():
            # Every rank of a lockstep group passes the same `rows`: the same graph bucket.
            if self._graphs is not None and self._graphs.fits(rows):
                _, chosen = self._graphs.run_host(last, [n - 1 for n in lens], slots, tables,
                                                  lens, rows, sampling=sampling)
            else:
                inputs = decode_batch(last, [n - 1 for n in lens], slots, tables, lens, rows,
                                      self.device)
                logits = self.model(*inputs)[0][:, -1]
        if not seqs:  # padding rows only: the call was for the other ranks' sequences
            self.stats.idle_calls += 1
            self.stats.idle_s += time.perf_counter() - start
            return []
        if chosen is None:
            chosen = sample(logits[: len(seqs)], sampling)
        tokens = chosen[: len(seqs)].tolist()
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(seqs)
        self.stats.decode_s += time.perf_counter() - start
        finished = []
        for seq, token in zip(seqs, tokens):
            finished += self._accept(seq, token)
        return finished

    def _accept(self, seq: _Sequence, token: int) -> list[Result]:
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


def _block_tables(tables: list[list[int]], rows: int, device: torch.device) -> torch.Tensor:
    """int32 [rows, widest table (at least 1)]; short tables and padding rows hold block 0,
    never read (attention stops at context_len)."""
    width = max([len(t) for t in tables] + [1])
    padded = [t + [0] * (width - len(t)) for t in tables] + [[0] * width] * (rows - len(tables))
    return torch.tensor(padded, dtype=torch.int32).view(rows, width).to(device)


def prefill_batch(
    prompts: list[list[int]], slots: list[list[int]], tables: list[list[int]], rows: int,
    length: int, device: torch.device,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The model inputs of one prefill call of shape ``[rows, length]``, and each prompt's last
    position (where its next-token logits are).

    Row ``i < len(prompts)`` holds prompt ``i`` right-padded to ``length``: pad tokens (id 0) get
    slot -1, so they write nothing, and attention is causal, so the prompt's own tokens never see
    them. Rows after the prompts are padding rows (another rank of the lockstep group prefills
    more prompts): every token id 0, slot -1. ``context_lens`` is ``length`` for every row, as
    ``adp.cached_attention`` checks for a prefill.
    """
    if rows < len(prompts) or any(len(p) > length for p in prompts):
        raise ValueError(f"{len(prompts)} prompts (longest {max(map(len, prompts), default=0)}) "
                         f"do not fit a prefill of [{rows}, {length}]")
    pad = [[0] * length] * (rows - len(prompts))
    ids = [p + [0] * (length - len(p)) for p in prompts] + pad
    slot_mapping = []
    for prompt, row in zip(prompts, slots):
        slot_mapping += list(row) + [-1] * (length - len(prompt))
    slot_mapping += [-1] * (length * (rows - len(prompts)))
    inputs = (
        torch.tensor(ids, dtype=torch.long).view(rows, length).to(device),
        torch.arange(length, device=device).expand(rows, length).contiguous(),
        torch.tensor(slot_mapping, dtype=torch.int64).to(device),
        _block_tables(tables, rows, device),
        torch.full((rows,), length, dtype=torch.int32).to(device),
    )
    last = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long).to(device)
    return inputs, last


def packed_batch(
    ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
    context_lens: list[int], query_starts: list[int], device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """The model inputs of one packed call: the tokens of N sequences back to back in one row
    (``input_ids [1, T]``), sequence n's from ``query_starts[n]`` to ``query_starts[n+1]``,
    attending to its first ``context_lens[n]`` cached tokens."""
    if len(query_starts) != len(tables) + 1 or query_starts[-1] != len(ids):
        raise ValueError(f"query_starts {query_starts} do not split {len(ids)} tokens into "
                         f"{len(tables)} sequences")
    return (
        torch.tensor(ids, dtype=torch.long).view(1, -1).to(device),
        torch.tensor(positions, dtype=torch.long).view(1, -1).to(device),
        torch.tensor(slots, dtype=torch.int64).to(device),
        _block_tables(tables, len(tables), device),
        torch.tensor(context_lens, dtype=torch.int32).to(device),
        torch.tensor(query_starts, dtype=torch.int32).to(device),
    )


def _takes_input(model: torch.nn.Module, name: str) -> bool:
    """The model's forward takes ``name``: ``query_start_loc`` (it can run packed calls),
    ``logits_indices`` (it can compute selected logits rows only)."""
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def decode_batch(
    tokens: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
    context_lens: list[int], rows: int, device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """The model inputs of one decode call of ``rows`` rows: the sequences first (their last
    token at its position, its new slot, their block tables and context lengths), then padding
    rows (token 0 at position 0, slot -1, context_len 0: they write nothing and read nothing)."""
    if rows < len(tokens):
        raise ValueError(f"{len(tokens)} sequences do not fit a decode of {rows} rows")
    pad = rows - len(tokens)
    return (
        torch.tensor(list(tokens) + [0] * pad, dtype=torch.long).view(rows, 1).to(device),
        torch.tensor(list(positions) + [0] * pad, dtype=torch.long).view(rows, 1).to(device),
        torch.tensor(list(slots) + [-1] * pad, dtype=torch.int64).to(device),
        _block_tables(tables, rows, device),
        torch.tensor(list(context_lens) + [0] * pad, dtype=torch.int32).to(device),
    )


class _DecodeGraphs:
    """Decode steps captured in CUDA graphs, one per batch size; smaller batches are padded to
    the next size (padding rows write to slot -1 and attend over an empty context).

    Each graph also takes the argmax of its logits (the greedy token), and its inputs live in
    two device buffers (int64: ids, positions, slots, source rows, seeds, counters; int32: block
    tables, context lengths) filled from pinned host copies by two copies a step: the step's host
    work is then a few array writes, not a dozen small tensors and kernels.

    A step with sampled rows also replays a *sampling graph* of its size after the decode graph:
    ``choose_tokens`` over the decode graph's logits, from a third buffer (fp32: 1 / temperature,
    top_p) and the seeds and counters, into the rows' tokens. Two per size, with and without the
    top-p cut, each captured the first time a step needs it (a greedy-only job never builds
    them), in a memory pool of their own.
    """

    def __init__(self, engine: RankEngine, sizes: list[int]) -> None:
        self.sizes = sizes
        self.width = width = engine.max_blocks
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.greedy: dict[int, torch.Tensor] = {}
        self.device_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.host_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.float_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sampling: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.sampling_pool = torch.cuda.graph_pool_handle()
        self.copied = torch.cuda.Event()  # the last host-to-device copies were made
        device = engine.device
        pool = torch.cuda.graph_pool_handle()
        self.last_tokens = last_tokens = engine._last_tokens
        for size in reversed(sizes):  # largest first, so smaller graphs reuse its memory
            # ids, positions, slots, the row of the previous step whose token is this row's
            # (-1: take the id), and the rows' sampling seeds and counters: one int64 buffer.
            longs = torch.zeros(6, size, dtype=torch.long, device=device)
            ints = torch.zeros(size * width + size, dtype=torch.int32, device=device)
            longs[2:4].fill_(-1)
            inputs = (
                longs[1].view(size, 1),  # positions
                longs[2],  # slots
                ints[: size * width].view(size, width),  # block tables
                ints[size * width:],  # context lengths
            )

            def decode_step(longs=longs, inputs=inputs, size=size):
                source = longs[3]
                ids = torch.where(source >= 0, last_tokens[source.clamp(min=0)], longs[0])
                logits = engine.model(ids.view(size, 1), *inputs)[0][:, -1]
                greedy = greedy_tokens(logits)
                last_tokens[:size].copy_(greedy)
                return logits, greedy

            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):  # warm up: Triton compiles, cuBLAS picks kernels
                    decode_step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.no_grad():
                self.outputs[size], self.greedy[size] = decode_step()
            self.graphs[size], self.inputs[size] = graph, (longs[0].view(size, 1), *inputs)
            self.device_buffers[size] = (longs, ints)
            self.host_buffers[size] = (torch.zeros_like(longs, device="cpu").pin_memory(),
                                       torch.zeros_like(ints, device="cpu").pin_memory())
            floats = torch.zeros(2, size, dtype=torch.float32, device=device)
            self.float_buffers[size] = (floats, torch.zeros_like(floats, device="cpu").pin_memory())
        torch.cuda.synchronize()

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _sampling_graph(self, size: int, cuts: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The sampling graph of ``size`` rows (with the top-p cut if ``cuts``) and its tokens
        output, captured on first use."""
        if (size, cuts) not in self.sampling:
            longs, _ = self.device_buffers[size]
            floats, _ = self.float_buffers[size]
            logits = self.outputs[size]

            def choose() -> torch.Tensor:
                return choose_tokens(logits, floats[0], floats[1], longs[4], longs[5], cuts=cuts)

            # Captured mid-serving, so not under ``torch.cuda.graph``: that synchronizes the
            # device and empties the allocator's cache (the next eager prefill would pay for
            # fresh cudaMallocs). The warm-up runs on the serving stream (its temporaries go back
            # to that stream's cache), the capture on a side stream that waits for it.
            with torch.no_grad():
                choose()  # warm up: Triton compiles
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream), torch.no_grad():
                graph.capture_begin(pool=self.sampling_pool, capture_error_mode="thread_local")
                try:
                    tokens = choose()
                    self.last_tokens[:size].copy_(tokens)  # the next step's input, as greedy's
                finally:
                    graph.capture_end()
            torch.cuda.current_stream().wait_stream(stream)
            self.sampling[size, cuts] = graph, tokens
        return self.sampling[size, cuts]

    def run_host(self, tokens: list[int], positions: list[int], slots: list[int],
                 tables: list[list[int]], context_lens: list[int],
                 rows: int, source: list[int] | None = None,
                 sampling: RowSampling | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph for ``rows`` rows (the sequences first, then padding rows) from
        host lists; its logits and each row's token, ``[rows, V]`` and ``[rows]``: the argmax,
        or for ``sampling`` (one entry per sequence) with sampled rows, the sampling graph's
        choice. ``source``: per sequence, the row of the previous replay whose token is its
        input (-1: the one in ``tokens``)."""
        size = next(s for s in self.sizes if s >= rows)
        batch, width = len(tokens), self.width
        host_longs, host_ints = self.host_buffers[size]
        sampled = sampling is not None and not sampling.greedy
        self.copied.synchronize()  # the pinned buffers are free to rewrite
        longs, ints = host_longs.numpy(), host_ints.numpy()
        longs[0, :batch], longs[1, :batch], longs[2, :batch] = tokens, positions, slots
        longs[3, :batch] = -1 if source is None else source
        longs[0, batch:], longs[1, batch:], longs[2:4, batch:], longs[4:, batch:] = 0, 0, -1, 0
        if sampled:
            longs[4, :batch], longs[5, :batch] = sampling.seeds, sampling.counters
            device_floats, host_floats = self.float_buffers[size]
            floats = host_floats.numpy()
            floats[0, :batch], floats[1, :batch] = sampling.inv_temperature, sampling.top_p
            floats[0, batch:], floats[1, batch:] = 0.0, 1.0  # padding rows: greedy
            device_floats.copy_(host_floats, non_blocking=True)
        table = ints[: size * width].reshape(size, width)
        table[:] = 0
        for row, blocks in enumerate(tables):
            table[row, : len(blocks)] = blocks
        lens = ints[size * width:]
        lens[:batch], lens[batch:] = context_lens, 0
        device_longs, device_ints = self.device_buffers[size]
        device_longs.copy_(host_longs, non_blocking=True)
        device_ints.copy_(host_ints, non_blocking=True)
        self.copied.record()
        self.graphs[size].replay()
        if not sampled:
            return self.outputs[size][:rows], self.greedy[size][:rows]
        graph, chosen = self._sampling_graph(size, sampling.cuts)
        graph.replay()
        return self.outputs[size][:rows], chosen[:rows]

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Replay from device tensors of :func:`decode_batch`; the logits."""
        tables = tensors[3].tolist()
        lens = tensors[4].tolist()
        logits, _ = self.run_host(tensors[0].view(-1).tolist(), tensors[1].view(-1).tolist(),
                                  tensors[2].tolist(), tables, lens, tensors[0].shape[0])
        return logits
