"""One rank's engine: continuous batching over the rank's own requests.

A step reads as three calls, nano-vllm's shape: the scheduler (runtime/scheduler.py) says what
runs, as a batch of plain host data with its KV slots allocated; the runner
(runtime/runner.py) runs it (the model's inputs, CUDA graph or eager call, the token choice);
the scheduler's ``postprocess`` takes the tokens and finishes sequences. The engine decides
which calls a step makes, in what order, and keeps their statistics.

The model is the rank's rewritten, lowered, cache-inserted graph. Under attention-DP with a
replicated MLP it holds no collective, so a rank steps on its own: it never waits for another
rank. A graph that takes ``query_start_loc`` (every graph the cache insertion builds) prefills
*packed*: the step's prompts back to back in one row, no padding, a prompt longer than the
step's token budget (``max_prefill_tokens``) split into chunks over several steps, and the
running sequences' decode rows in the same call (``_packed_step``). Otherwise (a lockstep
group, a model without it) prompts of different lengths share a call, right-padded to the
longest, while the padding stays under ``PREFILL_PADDING`` of their tokens.

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
(``_lockstep_step``; docs/runtime.md, "Lockstep stepping"). They too decode one step ahead:
the shapes are agreed from what the host knows before the step in flight is read.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Hashable

import torch

from adp_pass.runtime.kv_cache import PagedKVCache
from adp_pass.runtime.lockstep import Lockstep
from adp_pass.runtime.runner import ModelRunner, PendingTokens
# Re-exported: tests/test_rank_passes.py and bench/profile_decode.py import them from here.
from adp_pass.runtime.runner import decode_batch, prefill_batch  # noqa: F401
from adp_pass.runtime.scheduler import (EngineStats, Prefill, Request, Result, Scheduler,
                                        Sequence)


@dataclass
class _Launched:
    """A decode step launched and not yet read: its sequences in row order (padding rows
    after them hold none) and their tokens on the way to the host."""

    seqs: list[Sequence]
    tokens: PendingTokens


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
        self.lockstep = lockstep
        self._group_done = False  # lockstep: the last step found no work on any rank
        self.cache = cache
        self.stats = EngineStats()
        self.scheduler = Scheduler(cache, self.stats, max_batch=max_batch,
                                   max_prefill_tokens=max_prefill_tokens,
                                   max_position=max_position, seed=seed)
        # Lockstep groups too: a step's shapes are agreed from what the host knows before the
        # step in flight is read (a row that may have ended there stays a padding row).
        self.async_decode = async_decode
        self._inflight: _Launched | None = None
        self.runner = ModelRunner(
            model, cache.device, rows=max([max_batch, *(cuda_graph_sizes or ())]),
            # A captured decode graph's block tables cover the longest sequence it must serve.
            table_width=cache.blocks_for(max_seq_len) if max_seq_len else cache.num_blocks,
            cuda_graph_sizes=cuda_graph_sizes)
        # Packed prefill needs a graph that takes query_start_loc; a lockstep group pads
        # every rank's call to one [rows, length] instead.
        if packed_prefill and (not self.runner.packs or lockstep is not None):
            raise ValueError("packed prefill needs a model that takes query_start_loc and no "
                             "lockstep group")
        self.packed = self.runner.packs and lockstep is None if packed_prefill is None \
            else packed_prefill
        self.mix_decode = mix_decode
        # Triton compiles a prompt call's kernels (packed attention, the FP8 prefill GEMMs) on
        # first use and per specialization of the token count: run them before serving, as
        # vLLM's start-up forward does, so the first requests' TTFT is not a compile.
        if cache.device.type == "cuda":
            start = time.perf_counter()
            self.runner.warm_up_prompts(
                min(max_prefill_tokens, max_position or max_prefill_tokens, 1024),
                cache.blocks_for, packed=self.packed, decode_rows=max_batch)
            self.stats.prompt_warmup_s = time.perf_counter() - start

    # ------------------------------------------------------------------ public
    @property
    def waiting(self) -> deque[Request]:
        """Requests not admitted yet, in arrival order."""
        return self.scheduler.waiting

    @property
    def running(self) -> dict[Hashable, Sequence]:
        """Sequences past their prompt, generating."""
        return self.scheduler.running

    @property
    def prefilling(self) -> list[Prefill]:
        """Prompts admitted whose prefill runs in chunks over several steps."""
        return self.scheduler.prefilling

    def add(self, request: Request) -> None:
        """Queue ``request``; raises ValueError if it can never fit the KV cache or is empty."""
        self.scheduler.add(request)

    def cancel(self, request_id: Hashable) -> bool:
        """Drop a waiting or running request and free its KV blocks (a client that went away);
        False if it is not here (already finished). Safe between steps; with lockstep, every
        rank of the group must cancel at the same step (the online server broadcasts it)."""
        return self.scheduler.cancel(request_id)

    def partial_tokens(self) -> dict[Hashable, list[int]]:
        """The tokens each running request has generated so far (streaming reads them after
        every step; finished requests come back from :meth:`step` as results)."""
        return {rid: seq.generated for rid, seq in self.running.items()}

    @property
    def has_work(self) -> bool:
        """This rank has requests waiting or running."""
        return self.scheduler.has_work

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

    def prefill_logits(self, prompt: list[int] | None) -> torch.Tensor | None:
        """Next-token logits [V] of ``prompt`` from one prefill call that writes nothing to the
        cache (every slot -1): a check of the model, not serving. Collective with lockstep:
        every rank of the group calls it, ``None`` for a rank without a prompt."""
        rows, length = (1, len(prompt)) if prompt else (0, 0)
        if self.lockstep is not None:
            rows, length = self.lockstep.agree([rows, length])
        return self.runner.prefill_logits(prompt, rows, length) if rows else None

    # ------------------------------------------------------------------ steps
    def step(self) -> list[Result]:
        """Prompt work, then a decode step of the running sequences; the requests that
        finished."""
        if self.lockstep is not None:
            return self._lockstep_step()
        if self.packed:
            return self._packed_step()
        group = self.scheduler.admit()
        finished = self._prefill(group) if group else []
        return finished + self._decode()

    def _lockstep_step(self) -> list[Result]:
        """One step of the lockstep group: agree on ``[prefill rows, prompt length, decode rows,
        has work]`` (elementwise max), then every rank makes the same calls: one prefill of
        ``[rows, length]`` if any rank admits a prompt, one decode of ``[rows, 1]`` if any rank
        decodes, its own rows first and padding rows after."""
        work = self.has_work
        group = self.scheduler.admit()
        # Decode rows are bounded before the prefill samples: a prompt that finishes at its
        # first token leaves a padding row instead. One step ahead, the rows launched are those
        # whose token in flight is not certain to end them (``to_decode``); one that ends there
        # on a stop token is a row the host learns of a step late, as on a rank alone.
        decode_bound = len(self.scheduler.to_decode()) + len(group)
        start = time.perf_counter()
        prefill_rows, length, decode_rows, any_work = self.lockstep.agree(
            [len(group), max((len(r.prompt) for r in group), default=0), decode_bound, int(work)]
        )
        self.stats.agree_s += time.perf_counter() - start
        if not any_work:
            self._group_done = True
            return []
        if not prefill_rows and not decode_rows:
            if self._inflight is not None:  # nothing to launch: read the step in flight
                return self._decode(0)
            if not work:  # idle while a peer reads its step in flight
                return []
            raise RuntimeError("lockstep: a rank has work but no rank of the group can admit or "
                               "decode anything (max_batch 0?)")
        finished = self._prefill(group, prefill_rows, length) if prefill_rows else []
        if decode_rows:
            finished += self._decode(decode_rows)
        return finished

    def _packed_step(self) -> list[Result]:
        """Prefill chunks (and, with ``mix_decode``, every running sequence's decode row) in
        one packed call; a step without prompt work decodes as usual (CUDA graphs, one step
        ahead)."""
        chunks = self.scheduler.schedule_chunks()
        if not chunks:
            return self._decode()
        finished = []
        if self._inflight is not None:  # the decode rows below need their tokens on the host
            finished += self._read(self._inflight)
            self._inflight = None
        decoding = list(self.running.values()) if self.mix_decode else []
        start = time.perf_counter()
        batch, started = self.scheduler.packed_batch(chunks, decoding)
        tokens = self.runner.run_packed(batch)
        self.stats.prefill_tokens += sum(take for _, take in chunks)
        self.stats.prefill_calls += 1
        self.stats.prefill_s += time.perf_counter() - start
        if decoding:
            self.stats.mixed_calls += 1
            self.stats.decode_tokens += len(decoding)
        finished += self.scheduler.postprocess(started, decoding, tokens)
        if self.running and not self.mix_decode:
            finished += self._decode()  # the decode step after the prefill, in its own call
        return finished

    def _prefill(self, group: list[Request], rows: int | None = None,
                 length: int | None = None) -> list[Result]:
        """One prefill call for ``group``, right-padded to its longest prompt. Lockstep passes
        the agreed ``[rows, length]``: padding rows after the prompts."""
        start = time.perf_counter()
        tokens = self.runner.prefill(self.scheduler.prefill_batch(group, rows, length))
        if not group:  # padding rows only: the call was for the other ranks' prompts
            self.stats.idle_calls += 1
            self.stats.idle_s += time.perf_counter() - start
            return []
        self.stats.prefill_tokens += sum(len(r.prompt) for r in group)
        self.stats.prefill_calls += 1
        self.stats.prefill_s += time.perf_counter() - start
        return self.scheduler.postprocess(group, [], tokens)

    def _decode(self, rows: int | None = None) -> list[Result]:
        """One decode step of the running sequences; lockstep passes the agreed ``rows``
        (padding rows after the sequences). One step ahead (``async_decode``) it is launched,
        then the step in flight is read; in step with the host it is launched and read."""
        if not self.running and self._inflight is None and rows is None:
            return []
        start = time.perf_counter()
        finished = []
        if self._inflight is not None and not self.async_decode:  # switched to in step
            finished += self._read(self._inflight)
            self._inflight = None
        previous = self._inflight
        seqs = self.scheduler.to_decode()
        launched = None
        if seqs or rows:
            batch = self.scheduler.decode_batch(seqs, previous.seqs if previous else [], rows)
            launched = _Launched(seqs, self.runner.launch(batch))
            for seq in seqs:
                seq.pending += 1
        if self.async_decode:
            self._inflight, launched = launched, previous
        if launched is not None:
            finished += self._read(launched)
        if seqs or not rows:
            self.stats.decode_s += time.perf_counter() - start
        else:  # padding rows only: the call was for the other ranks' sequences
            self.stats.idle_calls += 1
            self.stats.idle_s += time.perf_counter() - start
        return finished

    def _read(self, launched: _Launched) -> list[Result]:
        """Wait for a launched step and take its tokens (the scheduler drops the rows of
        sequences that ended or were cancelled since the launch)."""
        if not launched.seqs:  # padding rows only: nothing to read
            return []
        seqs, tokens = self.scheduler.read_back(launched.seqs,
                                                self.runner.read(launched.tokens))
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(seqs)
        return self.scheduler.postprocess([], seqs, tokens)
