"""How a step runs: one rank's model calls, each from a batch of plain host data.

The engine (runtime/engine.py) decides what runs and hands the runner one batch per call: a
padded prefill (:class:`PrefillBatch`), a packed call of prompt chunks and decode rows back to
back (:class:`PackedBatch`) or a decode step (:class:`DecodeBatch`). The runner builds the
model's inputs, makes the call and chooses each sampled row's token: from logits on hand with
``sampling.sample``, or in a decode step's CUDA graphs, whose sampling graphs capture the
``choose_tokens`` that ``sample`` calls, so a token is the same whichever path made its logits.

A decode step is launched and read apart (:meth:`ModelRunner.launch`, :meth:`ModelRunner.read`):
decoding in step with the host reads each step right after launching it; one step ahead, the
engine launches step t+1 before reading step t. Either way the step goes through one input
building and one choice of CUDA graph or eager call (:meth:`ModelRunner._run_decode`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from adp_pass.runtime.sampling import RowSampling, choose_tokens, sample
from adp_pass.runtime.sampling import greedy as greedy_tokens


@dataclass
class PrefillBatch:
    """One prefill call of ``[rows, length]``: each prompt right-padded to ``length`` with its
    slots and block table, then padding rows (a lockstep group's agreed shape); the prompts'
    sampling inputs (their first token)."""

    prompts: list[list[int]]
    slots: list[list[int]]
    tables: list[list[int]]
    rows: int
    length: int
    sampling: RowSampling


@dataclass
class PackedBatch:
    """One packed call: the tokens of N sequences back to back in one row (prompt chunks, then
    decode rows of one token), sequence n's from ``query_starts[n]``, attending to its first
    ``context_lens[n]`` cached tokens; the token rows whose next token is chosen
    (``sample_rows``), with their sampling inputs."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    tables: list[list[int]]
    context_lens: list[int]
    query_starts: list[int]
    sample_rows: list[int]
    sampling: RowSampling


@dataclass
class DecodeBatch:
    """One decode step of ``rows`` rows: a row per sequence, then padding rows (a lockstep
    group's agreed size). Per sequence: its input token, or ``source``, its row of the step
    launched before this one whose token the host has not read (-1: take ``tokens``); its new
    slot, its block table and context length with that slot; its sampling inputs."""

    tokens: list[int]
    source: list[int]
    slots: list[int]
    tables: list[list[int]]
    context_lens: list[int]
    sampling: RowSampling
    rows: int


@dataclass
class PendingTokens:
    """A launched decode step's tokens on their way to the host, one per sequence: ``tokens``
    holds them once ``ready`` has passed (recorded after their copy; None: no copy to wait for,
    on a CPU or for a step of padding rows only)."""

    tokens: torch.Tensor
    ready: torch.cuda.Event | None


class ModelRunner:
    """Runs the calls of one rank's model: ``model(input_ids [B,S], positions [B,S],
    slot_mapping [B*S], block_tables [B,M], context_lens [B], query_start_loc=None,
    logits_indices=slice(None)) -> (logits [B,S,V],)``.

    ``rows``: the most rows a decode step has (the token buffers' size); ``table_width``: the
    block-table width of a captured decode graph (the longest sequence it serves); on a GPU,
    ``cuda_graph_sizes`` are the decode batch sizes captured in CUDA graphs.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, *, rows: int,
                 table_width: int, cuda_graph_sizes: tuple[int, ...] | None = None) -> None:
        self.model = model
        self.device = device
        # A graph that takes query_start_loc runs packed calls; one that takes logits_indices
        # computes the sampled logits rows only (the LM head over every prompt token is a
        # chunk's largest GEMM and its largest tensor). Decode calls need every row.
        self.packs = _takes_input(model, "query_start_loc")
        self.selects_logits = _takes_input(model, "logits_indices")
        # The last decode step's token per row, written by every decode graph, sampling graph
        # and eager decode: the next step's input for the rows whose token the host has not
        # read yet (DecodeBatch.source).
        self.last_tokens = torch.zeros(rows, dtype=torch.long, device=device)
        # Host copies of launched steps' tokens: two, alternating, so a launched step's copy
        # never lands on the buffer of the step in flight before it (read after this launch).
        self._token_buffers = [torch.zeros(rows, dtype=torch.long) for _ in range(2)]
        if device.type == "cuda":
            self._token_buffers = [b.pin_memory() for b in self._token_buffers]
        self._copies = 0
        self.graphs = None
        if cuda_graph_sizes and device.type == "cuda":
            self.graphs = DecodeGraphs(model, sorted(cuda_graph_sizes), table_width,
                                       self.last_tokens)

    # ------------------------------------------------------------------ prompt calls
    def prefill(self, batch: PrefillBatch) -> list[int]:
        """One padded prefill call; each prompt's first token (none for padding rows only)."""
        prompts = batch.prompts
        inputs, last = prefill_batch(prompts, batch.slots, batch.tables, batch.rows,
                                     batch.length, self.device)
        with torch.no_grad():
            if self.selects_logits:
                # The graph selects positions of every row: the prompts' distinct last positions
                # (rows x at most len(prompts) logits rows instead of rows x length).
                wanted = sorted({len(p) - 1 for p in prompts})
                logits = self._logits_at(inputs, wanted)
                column = {position: i for i, position in enumerate(wanted)}
                last = torch.tensor([column[len(p) - 1] for p in prompts],
                                    dtype=torch.long).to(self.device)
            else:
                logits = self.model(*inputs)[0]
        if not prompts:  # padding rows only: the call was for the other ranks' prompts
            return []
        logits = logits[torch.arange(len(prompts), device=self.device), last]
        return sample(logits, batch.sampling).tolist()

    def run_packed(self, batch: PackedBatch) -> list[int]:
        """One packed call; the token of each of ``batch.sample_rows``."""
        inputs = packed_batch(batch.ids, batch.positions, batch.slots, batch.tables,
                              batch.context_lens, batch.query_starts, self.device)
        rows = batch.sample_rows
        with torch.no_grad():
            if self.selects_logits:  # those rows alone; none for a chunk that ends no prompt
                picked = self._logits_at(inputs, rows)[0]
            else:
                logits = self.model(*inputs)[0][0]
                picked = logits[torch.tensor(rows, device=self.device)] if rows else None
        return sample(picked, batch.sampling).tolist() if rows else []

    def prefill_logits(self, prompt: list[int] | None, rows: int,
                       length: int) -> torch.Tensor | None:
        """Next-token logits [V] of ``prompt`` from one prefill call of ``[rows, length]`` that
        writes nothing to the cache (every slot -1); ``None`` for padding rows only."""
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

    def _logits_at(self, inputs: tuple[torch.Tensor, ...], positions: list[int]) -> torch.Tensor:
        """The model's logits ``[B, len(positions), V]`` at these positions of the sequence dim
        (a packed call: its token rows) only. ``positions`` may be empty: no LM head work."""
        index = torch.tensor(positions, dtype=torch.long).to(self.device)
        return self.model(*inputs, logits_indices=index)[0]

    def warm_up_prompts(self, tokens: int, blocks_for, *, packed: bool,
                        decode_rows: int = 0) -> None:
        """Run the prompt path before serving, writing nothing (every slot -1): Triton compiles
        its kernels per specialization, and a cold first prefill measured 2.5 s for what takes
        0.8 s warm (Qwen3-8B, 32k tokens, one H100). Packed: one sequence of ``tokens`` and
        ``tokens - 1`` (a count's divisibility by 16 is specialized), then a prompt beside
        ``decode_rows`` one-token rows over a short context (the mixed calls' short-query
        launch and the lookup sized by the sequence count). Padded: ``[1, tokens]`` and
        ``[1, tokens - 1]``. Every rank of a lockstep group makes the same calls, so the
        collectives inside match."""
        for count in (tokens, tokens - 1):
            if count < 2:
                continue
            if not packed:
                self.prefill_logits([0] * count, 1, count)
                continue
            self._warm_packed([count], [count], blocks_for)
        rows = min(decode_rows, tokens - 2)
        if packed and rows > 0:
            prompt = tokens - rows
            self._warm_packed([prompt] + [1] * rows, [prompt] + [2] * rows, blocks_for)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warm_packed(self, queries: list[int], contexts: list[int], blocks_for) -> None:
        """One packed call of these query lengths over these context lengths, writing nothing;
        the block tables point at block 0 (read, never written)."""
        total = sum(queries)
        starts = [0]
        positions = []
        for query, context in zip(queries, contexts):
            starts.append(starts[-1] + query)
            positions += list(range(context - query, context))
        tables = [[0] * blocks_for(c) for c in contexts]
        inputs = packed_batch([0] * total, positions, [-1] * total, tables, contexts, starts,
                              self.device)
        with torch.no_grad():
            if self.selects_logits:
                self._logits_at(inputs, [s - 1 for s in starts[1:]])
            else:
                self.model(*inputs)

    # ------------------------------------------------------------------ decode steps
    def launch(self, batch: DecodeBatch) -> PendingTokens:
        """Enqueue one decode step without waiting for it; :meth:`read` gives its tokens."""
        with torch.no_grad():
            chosen = self._run_decode(batch)
        count = len(batch.tokens)
        if not count:  # padding rows only (a lockstep group's other ranks decode): no token
            return PendingTokens(self._token_buffers[0][:0], None)
        self._copies += 1
        host = self._token_buffers[self._copies % 2][:count]
        if self.device.type != "cuda":
            host.copy_(chosen[:count])
            return PendingTokens(host, None)
        host.copy_(chosen[:count], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingTokens(host, ready)

    def read(self, pending: PendingTokens) -> list[int]:
        """A launched step's tokens, waiting for their copy to the host (a step's one sync)."""
        if pending.ready is not None:
            pending.ready.synchronize()
        return pending.tokens.tolist()

    def _run_decode(self, batch: DecodeBatch) -> torch.Tensor:
        """Run one decode step; each sequence's token, on the device. Replayed from the CUDA
        graph of the smallest captured size that holds ``batch.rows`` (every rank of a lockstep
        group passes the same rows: the same graph), else an eager call. Both leave the tokens
        in ``last_tokens``."""
        positions = [n - 1 for n in batch.context_lens]
        if self.graphs is not None and self.graphs.fits(batch.rows):
            return self.graphs.replay(batch.tokens, positions, batch.slots, batch.tables,
                                      batch.context_lens, batch.rows, batch.source,
                                      batch.sampling)
        inputs = decode_batch(batch.tokens, positions, batch.slots, batch.tables,
                              batch.context_lens, batch.rows, self.device)
        if any(row >= 0 for row in batch.source):
            inputs = (self._tokens_from(batch.source, inputs[0]), *inputs[1:])
        logits = self.model(*inputs)[0][:, -1]
        count = len(batch.tokens)
        if count:
            self.last_tokens[:count] = sample(logits[:count], batch.sampling)
        return self.last_tokens[:count]

    def _tokens_from(self, source: list[int], host_ids: torch.Tensor) -> torch.Tensor:
        """Input ids ``[rows, 1]``: row i reads the previous step's token of row ``source[i]``
        where that is >= 0, else ``host_ids`` (as do the padding rows after the sources)."""
        padded = source + [-1] * (host_ids.shape[0] - len(source))
        src = torch.tensor(padded, dtype=torch.long).to(self.device).view(-1, 1)
        return torch.where(src >= 0, self.last_tokens[src.clamp(min=0)], host_ids)


# ----------------------------------------------------------------------------- model inputs
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


def _takes_input(model: torch.nn.Module, name: str) -> bool:
    """The model's forward takes ``name``: ``query_start_loc`` (it can run packed calls),
    ``logits_indices`` (it can compute selected logits rows only)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- CUDA graphs
class DecodeGraphs:
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

    def __init__(self, model: torch.nn.Module, sizes: list[int], width: int,
                 last_tokens: torch.Tensor) -> None:
        self.sizes = sizes
        self.width = width
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.greedy: dict[int, torch.Tensor] = {}
        self.device_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.host_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.float_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sampling: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.sampling_pool = torch.cuda.graph_pool_handle()
        self.copied = torch.cuda.Event()  # the last host-to-device copies were made
        self.last_tokens = last_tokens
        device = last_tokens.device
        pool = torch.cuda.graph_pool_handle()
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
                logits = model(ids.view(size, 1), *inputs)[0][:, -1]
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
            self.graphs[size] = graph
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

    def replay(self, tokens: list[int], positions: list[int], slots: list[int],
               tables: list[list[int]], context_lens: list[int], rows: int, source: list[int],
               sampling: RowSampling) -> torch.Tensor:
        """Replay the graph for ``rows`` rows (the sequences first, then padding rows) from
        host lists; each row's token ``[rows]``: the argmax, or with sampled rows, the sampling
        graph's choice. ``source``: per sequence, the row of the previous replay whose token is
        its input (-1: the one in ``tokens``)."""
        size = next(s for s in self.sizes if s >= rows)
        batch, width = len(tokens), self.width
        host_longs, host_ints = self.host_buffers[size]
        sampled = not sampling.greedy
        self.copied.synchronize()  # the pinned buffers are free to rewrite
        longs, ints = host_longs.numpy(), host_ints.numpy()
        longs[0, :batch], longs[1, :batch], longs[2, :batch] = tokens, positions, slots
        longs[3, :batch] = source
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
            return self.greedy[size][:rows]
        graph, chosen = self._sampling_graph(size, sampling.cuts)
        graph.replay()
        return chosen[:rows]
