"""Benchmark adp.varlen_attention (packed variable-length attention over the paged KV cache).

GPU (Qwen3-8B attention: 32 q heads, 8 kv heads, head_dim 128, KV block 16, bf16)::

    python bench/bench_varlen_attention.py --out bench/results/varlen-attention-h200.json
    python bench/bench_varlen_attention.py --sweep     # also time a grid of packed-launch configs

CPU smoke test (Triton interpreter, tiny shapes, wall-clock timing)::

    python bench/bench_varlen_attention.py --device cpu --out /tmp/varlen-dry.json

Cases, each timed for our op and for what serves it today:

* ``decode``: 64 sequences x one query, context 512 and 2048. Baseline: adp.paged_decode_attention.
  GB/s = KV bytes read (every context token's K and V of every kv head) / time.
* ``prefill``: whole prompts, lengths drawn uniformly from 64-4096 (--seed) until ~8k tokens, packed.
  Baselines: SDPA (is_causal) on the right-padded batch [B, Hq, longest, D], and one SDPA call per
  prompt; both with K/V already repeated to the q heads (the repeat is not timed). TFLOP/s counts
  the useful causal work only: 4 * D * Hq * sum(L (L + 1) / 2).
* ``mixed``: one chunk of 512 queries after 2048 cached tokens plus 64 decode rows (context 2048)
  in one call. Baseline: adp.paged_decode_attention for the decode rows + SDPA for the chunk over
  its 2560 keys already gathered into a contiguous tensor (bottom-right causal mask; the gather
  is not timed). Our op is also timed on each part alone.

On a GPU every function is timed inside a CUDA graph (``triton.testing.do_bench_cudagraph``,
median), which also shows that the op captures: its grid comes from shapes only. Before timing,
our output is compared with the baseline's (max |diff| over the real rows; a warning above
--atol). Output: a table on stdout and JSON (--out) with the rows, the GPU name and versions.
"""

import argparse
import copy
import datetime
import json
import os
import random
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def _device_arg(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "cuda"


if _device_arg(sys.argv) == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gpu_timing import median_ms  # noqa: E402
from results_file import versions  # noqa: E402

import adp_pass.runtime.kernels.paged_attention  # noqa: E402,F401  (registers adp.paged_decode_attention)
import adp_pass.runtime.kernels.varlen_attention as va  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    decode_batch: int
    decode_contexts: tuple[int, ...]
    prompt_min: int
    prompt_max: int
    prefill_tokens: int
    chunk: int
    chunk_cached: int
    mixed_decode_context: int


QWEN3_8B = Sizes(32, 8, 128, 16, decode_batch=64, decode_contexts=(512, 2048), prompt_min=64, prompt_max=4096,
                 prefill_tokens=8192, chunk=512, chunk_cached=2048, mixed_decode_context=2048)  # fmt: skip
TINY = Sizes(8, 2, 32, 16, decode_batch=4, decode_contexts=(24, 70), prompt_min=8, prompt_max=48,
             prefill_tokens=96, chunk=24, chunk_cached=40, mixed_decode_context=40)  # fmt: skip
# --sweep: configs tried on top of the op's own (VARLEN_CONFIGS): the packed launch's on the
# prefill and mixed cases, the short launch's on the decode case.
PACKED_SWEEP = [dict(block_m=m, block_n=n, num_warps=w, num_stages=s)
                for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]  # fmt: skip
SHORT_SWEEP = [dict(short_block_n=n, short_num_warps=w, short_num_stages=s)
               for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 5)]  # fmt: skip


class Paged:
    """Sequences laid out in shuffled KV blocks of one cache pair, like the serving cache."""

    def __init__(self, context_lens: list[int], sizes: Sizes, dtype: torch.dtype, device: str, gen: torch.Generator):
        bs = sizes.block_size
        need = [-(-n // bs) for n in context_lens]
        num_blocks = sum(need)
        shape = (num_blocks, bs, sizes.kv_heads, sizes.head_dim)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        self.v_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        perm = torch.randperm(num_blocks, generator=gen)
        table = torch.zeros(len(context_lens), max(need), dtype=torch.int32)
        used = 0
        for i, nb in enumerate(need):
            table[i, :nb] = perm[used : used + nb].to(torch.int32)
            used += nb
        self.block_tables = table.to(device)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        self.lens = context_lens
        self.block_size = bs

    def select(self, rows: slice) -> "Paged":
        """The same cache seen by the sequences ``rows`` only."""
        part = copy.copy(self)
        part.block_tables, part.context_lens = self.block_tables[rows], self.context_lens[rows]
        part.lens = self.lens[rows]
        return part

    def dense(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's K and V as contiguous [context, kv_heads, head_dim]."""
        pos = torch.arange(self.lens[i], device=self.k_cache.device)
        blocks = self.block_tables[i].long()[pos // self.block_size]
        return self.k_cache[blocks, pos % self.block_size], self.v_cache[blocks, pos % self.block_size]


def query_start_loc(q_lens: list[int], device: str) -> torch.Tensor:
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def prompt_lengths(sizes: Sizes, seed: int) -> list[int]:
    """Uniform draws from [prompt_min, prompt_max] until the total would pass prefill_tokens;
    the remainder (if at least prompt_min) becomes the last prompt."""
    rng = random.Random(seed)
    lengths: list[int] = []
    while True:
        n = rng.randint(sizes.prompt_min, sizes.prompt_max)
        left = sizes.prefill_tokens - sum(lengths)
        if n > left:
            if left >= sizes.prompt_min:
                lengths.append(left)
            return lengths
        lengths.append(n)


def causal_flops(q_lens: list[int], context_lens: list[int], sizes: Sizes) -> float:
    """QK^T and PV multiply-adds of the keys each query sees (query j of a sequence with c keys
    and q new tokens sees c - q + j + 1 keys)."""
    seen = sum(q * (c - q) + q * (q + 1) // 2 for q, c in zip(q_lens, context_lens))
    return 4.0 * sizes.head_dim * sizes.q_heads * seen


def kv_bytes(context_lens: list[int], sizes: Sizes, dtype: torch.dtype) -> int:
    es = torch.empty((), dtype=dtype).element_size()
    return 2 * sum(context_lens) * sizes.kv_heads * sizes.head_dim * es


def make_timer(args: argparse.Namespace) -> Callable[[Callable], float]:
    """time_ms(fn) -> median milliseconds."""

    def time_ms(fn: Callable) -> float:
        return median_ms(fn, rep=args.rep, wall=args.device == "cpu", wall_calls=args.cpu_reps)

    return time_ms


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device
    sizes = TINY if device == "cpu" else QWEN3_8B
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(args.seed)
    scale = sizes.head_dim**-0.5
    group = sizes.q_heads // sizes.kv_heads
    time_ms = make_timer(args)
    rows: list[dict] = []

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)

    def record(case: str, shape: str, impl: str, fn: Callable, flops: float, nbytes: int, **extra) -> None:
        ms = time_ms(fn)
        row = dict(case=case, shape=shape, impl=impl, ms=ms, tflops=flops / (ms * 1e9),
                   gbps=nbytes / (ms * 1e6), **extra)  # fmt: skip
        rows.append(row)
        print(f"{case:>8} {shape:<28} {impl:<26} {ms * 1e3:10.1f} us {row['tflops']:8.1f} TFLOP/s "
              f"{row['gbps']:8.1f} GB/s", file=sys.stderr, flush=True)  # fmt: skip

    def check(case: str, got: torch.Tensor, want: torch.Tensor) -> float:
        diff = max_diff(got, want)
        if diff > args.atol:
            print(f"WARNING {case}: max |varlen - baseline| = {diff:.3g} > {args.atol}", file=sys.stderr)
        return diff

    def varlen_fn(q, paged: Paged, starts: torch.Tensor, config: dict | None = None) -> Callable:
        operands = (q, paged.k_cache, paged.v_cache, paged.block_tables, starts, paged.context_lens, scale)
        if config is None:
            return lambda: torch.ops.adp.varlen_attention(*operands)
        return lambda: va.varlen(*operands, **config)

    def sweep(case: str, shape: str, q, paged: Paged, starts, flops: float, nbytes: int) -> None:
        if not args.sweep:
            return
        base = va.varlen_config(q, paged.k_cache)
        for cfg in SHORT_SWEEP if case == "decode" else PACKED_SWEEP:
            config = dict(base, **cfg)
            name = "sweep " + " ".join(f"{key.removeprefix('short_')}={value}" for key, value in cfg.items())
            fn = varlen_fn(q, paged, starts, config)
            try:
                fn()
            except Exception as exc:  # e.g. out of shared memory: report, keep sweeping
                print(f"{case} {name}: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
                continue
            record(case, shape, name, fn, flops, nbytes, config=config)

    # (a) decode rows only.
    for context in sizes.decode_contexts:
        lens = [context] * sizes.decode_batch
        paged = Paged(lens, sizes, dtype, device, gen)
        q = randn(sizes.decode_batch, sizes.q_heads, sizes.head_dim)
        starts = query_start_loc([1] * sizes.decode_batch, device)
        ours = varlen_fn(q, paged, starts)
        decode = lambda: torch.ops.adp.paged_decode_attention(  # noqa: E731
            q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, scale)
        diff = check("decode", ours(), decode())
        shape = f"{sizes.decode_batch} x ctx {context}"
        flops, nbytes = causal_flops([1] * len(lens), lens, sizes), kv_bytes(lens, sizes, dtype)
        record("decode", shape, "varlen", ours, flops, nbytes, max_diff=diff)
        record("decode", shape, "paged_decode", decode, flops, nbytes)
        sweep("decode", shape, q, paged, starts, flops, nbytes)

    # (b) packed whole prompts.
    lens = prompt_lengths(sizes, args.seed)
    paged = Paged(lens, sizes, dtype, device, gen)
    q = randn(sum(lens), sizes.q_heads, sizes.head_dim)
    starts = query_start_loc(lens, device)
    ours = varlen_fn(q, paged, starts)
    longest = max(lens)
    q_pad = torch.zeros(len(lens), sizes.q_heads, longest, sizes.head_dim, dtype=dtype, device=device)
    k_pad, v_pad = torch.zeros_like(q_pad), torch.zeros_like(q_pad)
    per_prompt = []
    for i, n in enumerate(lens):
        k, v = paged.dense(i)
        q_pad[i, :, :n] = q[starts[i] : starts[i] + n].transpose(0, 1)
        k_pad[i, :, :n] = k.repeat_interleave(group, 1).transpose(0, 1)
        v_pad[i, :, :n] = v.repeat_interleave(group, 1).transpose(0, 1)
        per_prompt.append((q_pad[i : i + 1, :, :n], k_pad[i : i + 1, :, :n], v_pad[i : i + 1, :, :n]))
    padded = lambda: F.scaled_dot_product_attention(q_pad, k_pad, v_pad, is_causal=True, scale=scale)  # noqa: E731

    def looped() -> list[torch.Tensor]:
        return [F.scaled_dot_product_attention(*t, is_causal=True, scale=scale) for t in per_prompt]

    want = torch.cat([o[:, :n].transpose(0, 1) for o, n in zip(padded(), lens)])  # real rows only
    diff = check("prefill", ours(), want)
    shape = f"{len(lens)} prompts, {sum(lens)} tok"
    flops, nbytes = causal_flops(lens, lens, sizes), kv_bytes(lens, sizes, dtype)
    record("prefill", shape, "varlen", ours, flops, nbytes, max_diff=diff, prompt_lengths=lens)
    record("prefill", shape, "sdpa_padded", padded, flops, nbytes)
    record("prefill", shape, "sdpa_per_prompt", looped, flops, nbytes)
    sweep("prefill", shape, q, paged, starts, flops, nbytes)

    # (c) one later chunk plus decode rows in one call.
    chunk_ctx = sizes.chunk_cached + sizes.chunk
    q_lens = [sizes.chunk] + [1] * sizes.decode_batch
    lens = [chunk_ctx] + [sizes.mixed_decode_context] * sizes.decode_batch
    paged = Paged(lens, sizes, dtype, device, gen)
    q = randn(sum(q_lens), sizes.q_heads, sizes.head_dim)
    starts = query_start_loc(q_lens, device)
    ours = varlen_fn(q, paged, starts)
    # Each part alone through our op: views of the same cache and tables.
    chunk_part, decode_part = paged.select(slice(0, 1)), paged.select(slice(1, None))
    ours_chunk = varlen_fn(q[: sizes.chunk], chunk_part, query_start_loc(q_lens[:1], device))
    ours_decode = varlen_fn(q[sizes.chunk :], decode_part, query_start_loc(q_lens[1:], device))
    k, v = paged.dense(0)
    q_chunk = q[: sizes.chunk].transpose(0, 1).unsqueeze(0)
    k_chunk = k.repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).contiguous()
    v_chunk = v.repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).contiguous()
    q_pos = torch.arange(sizes.chunk_cached, chunk_ctx, device=device)
    mask = torch.arange(chunk_ctx, device=device)[None, :] <= q_pos[:, None]  # bottom-right causal
    q_decode = q[sizes.chunk :]

    def split_baseline() -> tuple[torch.Tensor, torch.Tensor]:
        chunk_out = F.scaled_dot_product_attention(q_chunk, k_chunk, v_chunk, attn_mask=mask, scale=scale)
        decode_out = torch.ops.adp.paged_decode_attention(
            q_decode, paged.k_cache, paged.v_cache, decode_part.block_tables, decode_part.context_lens, scale)
        return chunk_out, decode_out

    chunk_out, decode_out = split_baseline()
    diff = check("mixed", ours(), torch.cat([chunk_out[0].transpose(0, 1), decode_out]))
    shape = f"{sizes.chunk}@{sizes.chunk_cached} + {sizes.decode_batch} x ctx {sizes.mixed_decode_context}"
    flops, nbytes = causal_flops(q_lens, lens, sizes), kv_bytes(lens, sizes, dtype)
    record("mixed", shape, "varlen", ours, flops, nbytes, max_diff=diff)
    record("mixed", shape, "varlen_chunk_only", ours_chunk, causal_flops(q_lens[:1], lens[:1], sizes),
           kv_bytes(lens[:1], sizes, dtype))  # fmt: skip
    record("mixed", shape, "varlen_decode_only", ours_decode, causal_flops(q_lens[1:], lens[1:], sizes),
           kv_bytes(lens[1:], sizes, dtype))  # fmt: skip
    record("mixed", shape, "sdpa_chunk+paged_decode", split_baseline, flops, nbytes)
    sweep("mixed", shape, q, paged, starts, flops, nbytes)
    return rows


def report(rows: list[dict]) -> str:
    lines = ["| case | shape | impl | us | TFLOP/s | GB/s | max diff |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        diff = f"{r['max_diff']:.3g}" if "max_diff" in r else ""
        lines.append(f"| {r['case']} | {r['shape']} | {r['impl']} | {r['ms'] * 1e3:.1f} | {r['tflops']:.1f} "
                     f"| {r['gbps']:.0f} | {diff} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: Triton interpreter, tiny sizes, wall clock (a smoke test)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSON output (default: bench/results/varlen-attention-<gpu>.json, "
                        "or the temp directory with --device cpu)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="prompt lengths and tensor contents")
    parser.add_argument("--rep", type=int, default=200, help="ms of graph replays per measurement (GPU)")
    parser.add_argument("--cpu-reps", type=int, default=1, help="timed calls per measurement (CPU)")
    parser.add_argument("--atol", type=float, default=3e-2, help="warn when varlen differs from the baseline by more")
    parser.add_argument("--sweep", action="store_true", help="also time PACKED_SWEEP / SHORT_SWEEP configs")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for the smoke test")
    if args.device == "cpu" and args.sweep:
        parser.error("--sweep needs a GPU")

    rows = run(args)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    metadata = dict(
        gpu=gpu,
        versions=versions(),
        command=shlex.join([sys.executable, *sys.argv]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sizes=(TINY if args.device == "cpu" else QWEN3_8B).__dict__,
        dtype="bfloat16",
        timer="wall" if args.device == "cpu" else "do_bench_cudagraph (median)",
        configs={"varlen": va.VARLEN_CONFIGS},
    )
    if args.out is None:
        slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
        args.out = (Path(tempfile.gettempdir()) / "varlen-attention-cpu.json" if args.device == "cpu"
                    else Path(__file__).resolve().parent / "results" / f"varlen-attention-{slug}.json")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(metadata=metadata, rows=rows), indent=2) + "\n")
    print(report(rows))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
