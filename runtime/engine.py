"""One rank's engine: continuous batching over the rank's own requests.

The model is the rank's rewritten, lowered, cache-inserted graph:
``model(input_ids [B,S], positions [B,S], slot_mapping [B*S], block_tables [B,M],
context_lens [B]) -> (logits [B,S,V],)``. Under attention-DP with a replicated MLP the graph
holds no collective, so a rank steps on its own: it never waits for another rank.

Each step admits waiting requests whose KV blocks fit (prompts of equal length are prefilled
together), then runs one decode step for every running sequence. On a GPU the decode step is
replayed from CUDA graphs captured for a set of batch sizes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

import torch

from adp_pass.runtime.kv_cache import PagedKVCache
from adp_pass.runtime.sampling import SamplingParams, sample


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
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0

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
    ) -> None:
        self.model = model
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
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
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
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, requests: list[Request]) -> list[Result]:
        for request in requests:
            self.add(request)
        results: list[Result] = []
        while self.has_work:
            results += self.step()
        order = {r.request_id: i for i, r in enumerate(requests)}
        return sorted(results, key=lambda r: order[r.request_id])

    def step(self) -> list[Result]:
        finished = self._admit()
        if self.running:
            finished += self._decode()
        return finished

    # ------------------------------------------------------------------ scheduling
    def _blocks_still_needed(self) -> int:
        """Blocks the running sequences will take before they finish (reserved up front, so a
        running sequence never runs out of cache mid-generation)."""
        total = 0
        for seq in self.running.values():
            final = len(seq.request.prompt) + seq.request.params.max_new_tokens
            total += self.cache.blocks_for(final) - len(self.cache.block_table(seq.request.request_id))
        return total

    def _admit(self) -> list[Result]:
        group: list[Request] = []
        budget = self.cache.num_free_blocks - self._blocks_still_needed()
        while self.waiting and len(self.running) + len(group) < self.max_batch:
            request = self.waiting[0]
            if group and len(request.prompt) != len(group[0].prompt):
                break  # one prefill call takes prompts of one length
            if (len(group) + 1) * len(request.prompt) > self.max_prefill_tokens and group:
                break
            need = self.cache.blocks_for(len(request.prompt) + request.params.max_new_tokens)
            if need > budget:
                break
            budget -= need
            group.append(self.waiting.popleft())
        return self._prefill(group) if group else []

    def _prefill(self, group: list[Request]) -> list[Result]:
        start = time.perf_counter()
        length = len(group[0].prompt)
        slots = []
        for request in group:
            slots += self.cache.allocate(request.request_id, length)
        ids = torch.tensor([r.prompt for r in group], dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device).expand(len(group), length)
        inputs = self._metadata([r.request_id for r in group], slots)
        with torch.no_grad():
            logits = self.model(ids, positions.contiguous(), *inputs)[0][:, -1]
        tokens = sample(logits, [r.params for r in group], self.generator).tolist()
        self.stats.prefill_tokens += len(group) * length
        self.stats.prefill_s += time.perf_counter() - start
        finished = []
        for request, token in zip(group, tokens):
            seq = _Sequence(request)
            self.running[request.request_id] = seq
            finished += self._accept(seq, token)
        return finished

    def _decode(self) -> list[Result]:
        start = time.perf_counter()
        seqs = list(self.running.values())
        ids = [s.request.request_id for s in seqs]
        slots = [self.cache.append(i, 1)[0] for i in ids]
        last = torch.tensor([[s.generated[-1]] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor(
            [[self.cache.context_len(i) - 1] for i in ids], dtype=torch.long, device=self.device
        )
        inputs = self._metadata(ids, slots)
        with torch.no_grad():
            if self._graphs is not None and self._graphs.fits(len(seqs)):
                logits = self._graphs.run(last, positions, *inputs)
            else:
                logits = self.model(last, positions, *inputs)[0][:, -1]
        tokens = sample(logits, [s.request.params for s in seqs], self.generator).tolist()
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(seqs)
        self.stats.decode_s += time.perf_counter() - start
        finished = []
        for seq, token in zip(seqs, tokens):
            finished += self._accept(seq, token)
        return finished

    def _metadata(self, seq_ids: list[Hashable], slots: list[int]) -> tuple[torch.Tensor, ...]:
        return (
            self.cache.slot_mapping(slots),
            self.cache.block_tables(seq_ids),
            self.cache.context_lens(seq_ids),
        )

    def _accept(self, seq: _Sequence, token: int) -> list[Result]:
        seq.generated.append(token)
        params = seq.request.params
        reason = None
        if token in params.stop_token_ids:
            reason = "stop"
        elif len(seq.generated) >= params.max_new_tokens:
            reason = "length"
        elif self.max_position is not None and (
            len(seq.request.prompt) + len(seq.generated) >= self.max_position
        ):
            reason = "max_position"
        if reason is None:
            return []
        request_id = seq.request.request_id
        del self.running[request_id]
        self.cache.free(request_id)
        return [Result(request_id, len(seq.request.prompt), seq.generated, reason)]


class _DecodeGraphs:
    """Decode steps captured in CUDA graphs, one per batch size; smaller batches are padded to
    the next size (padding rows write to slot -1 and attend over an empty context)."""

    def __init__(self, engine: RankEngine, sizes: list[int]) -> None:
        self.sizes = sizes
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        device, width = engine.device, engine.max_blocks
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(sizes):  # largest first, so smaller graphs reuse its memory
            inputs = (
                torch.zeros(size, 1, dtype=torch.long, device=device),
                torch.zeros(size, 1, dtype=torch.long, device=device),
                torch.full((size,), -1, dtype=torch.long, device=device),
                torch.zeros(size, width, dtype=torch.int32, device=device),
                torch.zeros(size, dtype=torch.int32, device=device),
            )
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):  # warm up: Triton compiles, cuBLAS picks kernels
                    engine.model(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.no_grad():
                self.outputs[size] = engine.model(*inputs)[0][:, -1]
            self.graphs[size], self.inputs[size] = graph, inputs
        torch.cuda.synchronize()

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = tensors[0].shape[0]
        size = next(s for s in self.sizes if s >= batch)
        static = self.inputs[size]
        ids, positions, slots, tables, lens = static
        ids[:batch].copy_(tensors[0])
        positions[:batch].copy_(tensors[1])
        slots.fill_(-1)
        slots[:batch].copy_(tensors[2])
        tables.zero_()
        tables[:batch, : tensors[3].shape[1]].copy_(tensors[3])
        lens.zero_()
        lens[:batch].copy_(tensors[4])
        self.graphs[size].replay()
        return self.outputs[size][:batch]
