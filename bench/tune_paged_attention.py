"""Tune the paged decode attention kernel's launch configs (runtime/kernels/paged_attention.py).

One GPU command (about 2 minutes on an H200)::

    python bench/tune_paged_attention.py --out bench/results/tune-paged-attention-h200.json

CPU smoke test (Triton interpreter, tiny shapes, wall-clock timing)::

    python bench/tune_paged_attention.py --dry-run --out /tmp/tune-dry.json

Qwen3-8B decode (32 q heads, 8 kv heads, head_dim 128, KV block 16, bf16) at batch 64 and 256 x
context 512 and 2048, plus batch 16 x 2048 for split-K. Every sequence is exactly ``context``
tokens long, in shuffled physical blocks; the block table is wider than the context (--slack),
as under CUDA graphs. Each candidate (tokens per iteration x num_warps x num_stages x dot mode,
then split counts for the best ones), the op's current choice ("table") and the kernel before
issue 12 ("old") are timed inside a CUDA graph of back-to-back calls that alternate between two
caches (two layers, so L2 cannot hold the KV between calls), median of --reps graph replays.
GB/s = KV bytes read (context x kv_heads x head_dim x 2 (K, V) x 2 bytes per sequence) / time;
% copy = that / the measured device-to-device copy bandwidth ((read + write bytes) / time).
Every candidate's output is compared with an fp32 torch reference (max |diff|); a candidate over
--atol is marked wrong and never recommended. The report ends with the DECODE_CONFIGS / SPLIT_K
entries to paste into runtime/kernels/paged_attention.py.
"""

import argparse
import datetime
import itertools
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gpu_timing import graph_ms, loop_ms  # noqa: E402
from results_file import versions  # noqa: E402

import adp_pass.runtime.kernels.paged_attention as pa  # noqa: E402

# (q_heads, kv_heads, head_dim, block_size)
QWEN3_8B = (32, 8, 128, 16)
TINY = (4, 2, 64, 16)
MAIN_SHAPES = [(64, 512), (64, 2048), (256, 512), (256, 2048)]  # (batch, context)
SPLIT_SHAPES = [(16, 2048)]  # fewer programs than SMs: where split-K matters
# Phase 1: native 16-bit dots over this grid; phase 2: the fp32-operand (tf32) dot mode for the
# TOP fastest; phase 3: split-K for the TOP fastest per shape. About one Triton compile per config.
# num_stages 3/5/7 keep 1/2/3 K/V tiles in flight (see DECODE_CONFIGS); 1 = plain loads.
GRID = dict(tokens=[32, 64, 128], num_warps=[4, 8], num_stages=[1, 3, 5, 7], native_dot=[True])
DRY_GRID = dict(tokens=[16, 32], num_warps=[4], num_stages=[1, 5], native_dot=[True])
TOP = 3
SPLITS = [1, 2, 4]
SMALL_BATCH_SPLITS = [1, 2, 4, 8]


# The decode kernel as it was before issue 12 (one 16-token block per iteration, int64 offsets,
# no pipelining), kept here as the baseline the tuning is measured against.
@triton.jit
def _legacy_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb, stride_btn, stride_cl,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    qk_scale_log2, head_dim, max_blocks, blocks_per_split,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)

    ctx = tl.load(context_lens_ptr + seq * stride_cl).to(tl.int64)
    first = split * blocks_per_split
    # Clamp to the table width so a context_len beyond it cannot read out of bounds.
    num_blocks = tl.minimum(tl.cdiv(ctx, BLOCK_SIZE), max_blocks)
    last = tl.minimum(first + blocks_per_split, num_blocks)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    t = tl.arange(0, BLOCK_SIZE)
    g_mask = g < GROUP
    d_mask = d < head_dim
    heads = kvh * GROUP + g  # HF repeat_kv order: kv head i serves q heads i*GROUP ..

    # All dots take fp32 operands: fp16/bf16 values are exact in tf32, P keeps 10
    # mantissa bits instead of 7, and the Triton interpreter multiplies bf16 dot
    # operands as raw uint16 bits. Decode is bandwidth-bound, so the cost is nil.
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    for j in range(first, last):
        phys = tl.load(block_tables_ptr + seq * stride_btb + j * stride_btn).to(tl.int64)
        valid = (j * BLOCK_SIZE + t) < ctx
        kv_off = phys * stride_cb + t[:, None] * stride_cs + kvh * stride_ch + d[None, :] * stride_cd
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        # Every visited block holds >= 1 valid token, so m_new is finite here.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Empty range (context_len 0, or a split past the end): emit zeros, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :] * stride_od
    o_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        tl.store(o_ptrs, out, mask=o_mask)
        # log2-domain log-sum-exp of this split; -inf for an empty split.
        lse = m_i + tl.log2(l_safe)
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


def legacy_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    """The old op's launch: splits only when batch * kv_heads < SMs, over the table width."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    batch, num_q_heads, _ = q.shape
    max_blocks = block_tables.shape[1]
    splits = 1
    if q.is_cuda and batch * num_kv_heads < pa._sm_count(q.device.index or 0):
        sms = pa._sm_count(q.device.index or 0)
        splits = max(1, min(triton.cdiv(sms, batch * num_kv_heads), max_blocks // 8, 32))
    group = num_q_heads // num_kv_heads
    meta = dict(
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), SPLIT=splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    out = q.new_empty(q.shape)
    common = (*q.stride(), *k_cache.stride(), *block_tables.stride(), context_lens.stride(0))
    scale_log2 = scale * pa._LOG2E
    if splits == 1:
        _legacy_decode_kernel[(batch, num_kv_heads, 1)](
            q, k_cache, v_cache, block_tables, context_lens, out, out,
            *common, out.stride(0), out.stride(1), 0, out.stride(2), 0, 0, 0,
            scale_log2, head_dim, max_blocks, max_blocks, **meta,
        )  # fmt: skip
        return out
    part = q.new_empty((batch, num_q_heads, splits, head_dim), dtype=torch.float32)
    lse = q.new_empty((batch, num_q_heads, splits), dtype=torch.float32)
    _legacy_decode_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse,
        *common, *part.stride(), *lse.stride(),
        scale_log2, head_dim, max_blocks, triton.cdiv(max_blocks, splits), **meta,
    )  # fmt: skip
    pa._combine_splits_kernel[(batch, num_q_heads)](
        part, lse, out, *part.stride(), *lse.stride(), *out.stride(), splits, head_dim,
        SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )  # fmt: skip
    return out


# --- inputs and reference ---------------------------------------------------------------------
def make_inputs(batch, context, dims, dtype, device, slack, layers=2, seed=0):
    """q, per-layer (k_cache, v_cache), block_tables, context_lens: every sequence ``context``
    tokens in shuffled blocks; table width = context * slack, rounded up to 16 blocks (so every
    shape shares one compiled kernel per config: same stride specialisation)."""
    q_heads, kv_heads, head_dim, block_size = dims
    gen = torch.Generator(device="cpu").manual_seed(seed)
    need = triton.cdiv(context, block_size)
    width = triton.cdiv(max(need, math.ceil(context * slack / block_size)), 16) * 16
    num_blocks = batch * need + 1
    perm = torch.randperm(num_blocks, generator=gen)[: batch * need].view(batch, need)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    tables[:, :need] = perm.to(torch.int32)
    caches = []
    for _ in range(layers):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        caches.append((torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)))
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    lens = torch.full((batch,), context, dtype=torch.int32)
    return q, caches, tables.to(device), lens.to(device)


def reference(q, k_cache, v_cache, tables, context, scale, chunk=16):
    """fp32 attention over the gathered context, ``chunk`` sequences at a time (memory)."""
    batch, q_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    need = triton.cdiv(context, block_size)
    out = torch.empty(batch, q_heads, head_dim, dtype=torch.float32, device=q.device)
    for b0 in range(0, batch, chunk):
        t = tables[b0 : b0 + chunk, :need].long()
        k = k_cache[t].flatten(1, 2)[:, :context].float()  # [b, ctx, kv, D]
        v = v_cache[t].flatten(1, 2)[:, :context].float()
        k = k.repeat_interleave(q_heads // kv_heads, dim=2)
        v = v.repeat_interleave(q_heads // kv_heads, dim=2)
        s = torch.einsum("bhd,bthd->bht", q[b0 : b0 + chunk].float(), k) * scale
        out[b0 : b0 + chunk] = torch.einsum("bht,bthd->bhd", torch.softmax(s, -1), v)
    return out


# --- timing -----------------------------------------------------------------------------------
def layers_graph_ms(fn, reps, target_ms=3.0):
    """Median ms per call of ``fn(layer)``, from a CUDA graph of back-to-back calls over two layers."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        fn(0), fn(1)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    one_ms = loop_ms(lambda i: fn(i % 2), 4)
    calls = max(4, min(400, 2 * round(target_ms / max(one_ms, 1e-3) / 2)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % 2)
    graph.replay()
    samples = [graph_ms(graph, 1) / calls for _ in range(reps)]
    del graph
    return statistics.median(samples)


def wall_ms(fn, reps):
    fn(0)
    samples = []
    for i in range(min(reps, 3)):
        t0 = time.perf_counter()
        fn(i % 2)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_gbps(args) -> float:
    """Device-to-device copy bandwidth, (read + write bytes) / time, 1 GiB each way."""
    if args.dry_run:
        return float("nan")
    n = 1 << 30
    src = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    ms = layers_graph_ms(lambda i: dst.copy_(src[i]), args.reps, target_ms=20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e6)


# --- the run ----------------------------------------------------------------------------------
def cfg_name(cfg: dict) -> str:
    return (f"t{cfg['tokens']}-w{cfg['num_warps']}-s{cfg['num_stages']}-"
            f"{'native' if cfg['native_dot'] else 'fp32'}-k{cfg['num_splits']}")  # fmt: skip


def measure_shape(args, dims, batch, context, candidates, copy_bw, log):
    """Rows for one shape: each candidate (a config dict, "table" or "old") timed and checked."""
    dtype = torch.bfloat16
    device = "cpu" if args.dry_run else "cuda"
    q, caches, tables, lens = make_inputs(batch, context, dims, dtype, device, args.slack)
    scale = dims[2] ** -0.5
    ref = reference(q, *caches[0], tables, context, scale)
    kv_bytes = batch * context * dims[1] * dims[2] * 2 * q.element_size()
    rows = []
    for cand in candidates:
        if cand == "old":
            name, cfg = "old", None
            call = lambda i: legacy_decode(q, *caches[i], tables, lens, scale)  # noqa: E731
        elif cand == "table":
            cfg = pa.decode_config(q, caches[0][0], tables.shape[1])
            name = "table:" + cfg_name(cfg)
            call = lambda i: torch.ops.adp.paged_decode_attention(q, *caches[i], tables, lens, scale)  # noqa: E731
        else:
            name, cfg = cfg_name(cand), cand
            call = lambda i, c=cand: pa.paged_decode(q, *caches[i], tables, lens, scale, **c)  # noqa: E731
        row = dict(batch=batch, context=context, name=name, config=cfg, kv_bytes=kv_bytes,
                   table_tokens=tables.shape[1] * dims[3])
        try:
            row["max_abs_diff"] = (call(0).float() - ref).abs().max().item()
            row["ok"] = row["max_abs_diff"] <= args.atol  # NaN compares False
            row["ms"] = (wall_ms if args.dry_run else layers_graph_ms)(call, args.reps)
            row["gbps"] = kv_bytes / (row["ms"] * 1e6)
            row["pct_copy"] = 100 * row["gbps"] / copy_bw
        except Exception as exc:  # e.g. out of shared memory for a deep pipeline of big tiles
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        rows.append(row)
        log(row)
    del q, caches, tables, lens, ref
    if not args.dry_run:
        torch.cuda.empty_cache()
    return rows


def grid_configs(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values), num_splits=1) for values in itertools.product(*grid.values())]


def best(rows):
    good = [r for r in rows if r.get("ok") and "ms" in r and r["config"] is not None and r["name"] != "old"]
    return min(good, key=lambda r: r["ms"]) if good else None


def common_best(rows, shapes):
    """The single-split config with the best geometric-mean time ratio to each shape's best."""
    by_cfg = {}
    for r in rows:
        if ((r["batch"], r["context"]) in shapes and r.get("ok") and r["config"] and r["config"]["num_splits"] == 1
                and not r["name"].startswith("table")):
            by_cfg.setdefault(r["name"], {})[(r["batch"], r["context"])] = r
    if not by_cfg:
        return None, None
    fastest = {s: min((x[s]["ms"] for x in by_cfg.values() if s in x), default=math.inf) for s in shapes}
    scored = [
        (math.exp(statistics.fmean(math.log(x[s]["ms"] / fastest[s]) for s in shapes)), name)
        for name, x in by_cfg.items() if all(s in x for s in shapes)
    ]  # fmt: skip
    if not scored:
        return None, None
    score, name = min(scored)
    return next(iter(by_cfg[name].values()))["config"], score


def run(args, log):
    dims = TINY if args.dry_run else QWEN3_8B
    main_shapes = [(2, 40), (3, 70)] if args.dry_run else MAIN_SHAPES
    split_shapes = [(1, 70)] if args.dry_run else SPLIT_SHAPES
    grid = grid_configs(DRY_GRID if args.dry_run else GRID)
    if args.max_configs:
        grid = grid[: args.max_configs]
    copy_bw = copy_gbps(args)
    print(f"copy bandwidth {copy_bw:.0f} GB/s (read + write)", file=sys.stderr, flush=True)
    rows = []
    for batch, context in main_shapes:
        rows += measure_shape(args, dims, batch, context, ["old", "table", *grid], copy_bw, log)

    def top(shape_rows, n):
        mine = [r for r in shape_rows if r.get("ok") and r["config"] and not r["name"].startswith("table")]
        return [r["config"] for r in sorted(mine, key=lambda r: r["ms"])[:n]]

    # Phase 2: the same tiles with fp32-operand tf32 dots (P keeps 10 bits), for the best ones.
    by_shape = {shape: [r for r in rows if (r["batch"], r["context"]) == shape] for shape in main_shapes}
    seen = {cfg_name(c) for c in grid}
    fp32_cands = []
    for shape in main_shapes:
        for c in top(by_shape[shape], TOP):
            c = dict(c, native_dot=False)
            if cfg_name(c) not in seen:
                seen.add(cfg_name(c))
                fp32_cands.append(c)
    for batch, context in main_shapes:
        rows += measure_shape(args, dims, batch, context, fp32_cands, copy_bw, log)
    # Phase 3: split-K for each main shape's fastest single-split configs, and the small batch.
    split_rows = []
    for batch, context in main_shapes:
        shape_rows = [r for r in rows if (r["batch"], r["context"]) == (batch, context)]
        cands = [dict(c, num_splits=k) for c in top(shape_rows, TOP) for k in SPLITS if k > 1]
        split_rows += measure_shape(args, dims, batch, context, cands, copy_bw, log)
    common, _ = common_best(rows, main_shapes)
    for batch, context in split_shapes:
        base = common or grid[0]
        cands = ["old", "table", *[dict(base, num_splits=k) for k in SMALL_BATCH_SPLITS]]
        split_rows += measure_shape(args, dims, batch, context, cands, copy_bw, log)
    return rows + split_rows, copy_bw, main_shapes, split_shapes


def fmt_row(r) -> str:
    if "error" in r:
        return f"| {r['batch']} | {r['context']} | {r['name']} | error | | | {r['error'][:60]} |"
    flag = "" if r["ok"] else " WRONG"
    return (f"| {r['batch']} | {r['context']} | {r['name']} | {r['ms'] * 1e3:.1f} | {r['gbps']:.0f} | "
            f"{r['pct_copy']:.1f} | {r['max_abs_diff']:.2e}{flag} |")  # fmt: skip


def report(rows, copy_bw, main_shapes, split_shapes, dims) -> tuple[str, dict]:
    lines = [f"copy bandwidth: {copy_bw:.0f} GB/s", "",
             "| batch | context | config | us | GB/s | % copy | max abs diff |", "|---:|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["batch"], r["context"], r.get("ms", math.inf))):
        lines.append(fmt_row(r))
    summary = {"per_shape": {}}
    lines += ["", "Per shape: old -> table (current DECODE_CONFIGS) -> best candidate"]
    for shape in [*main_shapes, *split_shapes]:
        rs = [r for r in rows if (r["batch"], r["context"]) == shape]
        pick = {k: next((r for r in rs if r["name"].startswith(k) and "ms" in r), None) for k in ("old", "table")}
        b = best(rs)
        cells = [f"{k} {pick[k]['pct_copy']:.1f}%" for k in pick if pick[k]]
        if b:
            cells.append(f"best {b['pct_copy']:.1f}% ({b['name']}, {b['ms'] * 1e3:.1f} us)")
        lines.append(f"- B={shape[0]} ctx={shape[1]}: " + ", ".join(cells))
        summary["per_shape"][f"{shape[0]}x{shape[1]}"] = {
            "old_pct": pick["old"] and pick["old"]["pct_copy"], "table_pct": pick["table"] and pick["table"]["pct_copy"],
            "best": b and {"name": b["name"], "config": b["config"], "pct_copy": b["pct_copy"], "ms": b["ms"]},
        }  # fmt: skip
    common, score = common_best(rows, main_shapes)
    head_dim_pad = triton.next_power_of_2(dims[2])
    if common:
        entry = {k: common[k] for k in ("tokens", "num_warps", "num_stages", "native_dot")}
        summary["recommended_decode_config"] = {str(head_dim_pad): entry, "geomean_slowdown_vs_per_shape_best": score}
        lines += ["", f"Best single config over {main_shapes} (geomean {score:.3f}x of each shape's best):",
                  f"    DECODE_CONFIGS[{head_dim_pad}] = dict({', '.join(f'{k}={v}' for k, v in entry.items())})"]  # fmt: skip
    # Split-K: does splitting beat 1 split at the main shapes (many programs) / the small batch?
    lines += ["", "Split-K (same config, num_splits k vs 1):"]
    split_gain = {}
    for shape in [*main_shapes, *split_shapes]:
        rs = [r for r in rows if (r["batch"], r["context"]) == shape and r.get("ok") and r["config"]
              and not r["name"].startswith("table")]  # fmt: skip
        one = {cfg_name(dict(r["config"], num_splits=1)): r["ms"] for r in rs if r["config"]["num_splits"] == 1}
        gains = {}
        for r in rs:
            k = r["config"]["num_splits"]
            base = one.get(cfg_name(dict(r["config"], num_splits=1)))
            if k > 1 and base:
                gains[k] = max(gains.get(k, 0.0), base / r["ms"])
        split_gain[f"{shape[0]}x{shape[1]}"] = gains
        programs = shape[0] * dims[1]
        lines.append(f"- B={shape[0]} ctx={shape[1]} ({programs} programs): "
                     + (", ".join(f"k={k}: {g:.2f}x" for k, g in sorted(gains.items())) or "n/a"))  # fmt: skip
    summary["split_speedup"] = split_gain
    # programs_per_sm whose heuristic split count matches each shape's best (k with > 3% gain, else 1).
    want = {}
    for shape in [*main_shapes, *split_shapes]:
        gains = split_gain[f"{shape[0]}x{shape[1]}"]
        k, g = max(gains.items(), key=lambda kv: kv[1], default=(1, 1.0))
        want[shape] = k if g > 1.03 else 1
    sms = 132 if copy_bw != copy_bw else pa._sm_count(torch.cuda.current_device())  # NaN: dry run
    capacity = {(r["batch"], r["context"]): r["table_tokens"] for r in rows}

    def heuristic_k(pps, shape):  # pa._auto_num_splits with programs_per_sm = pps
        programs, cap = shape[0] * dims[1], capacity[shape]
        if programs >= pps * sms:
            return 1
        return max(1, min(triton.cdiv(pps * sms, programs), max(1, cap // pa.SPLIT_K["min_split_tokens"]),
                          pa.SPLIT_K["max_splits"]))  # fmt: skip

    score = {pps: sum(heuristic_k(pps, s) == k for s, k in want.items()) for pps in range(1, 17)}
    pps = max(score, key=lambda p: (score[p], -abs(p - pa.SPLIT_K["programs_per_sm"])))
    summary["recommended_split_k_programs_per_sm"] = pps
    lines += ["", f"Best split count per shape (> 3% gain, else 1): "
              + ", ".join(f"B={s[0]} ctx={s[1]}: {k}" for s, k in want.items()),
              f"    SPLIT_K['programs_per_sm'] = {pps}   # matches {score[pps]}/{len(want)} shapes "
              f"(now {pa.SPLIT_K['programs_per_sm']}: {score.get(pa.SPLIT_K['programs_per_sm'], 0)})"]  # fmt: skip
    return "\n".join(lines), summary


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON path")
    p.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter smoke test, tiny shapes")
    p.add_argument("--reps", type=int, default=15, help="graph replays per measurement (median)")
    p.add_argument("--slack", type=float, default=1.25, help="block table width / context (CUDA-graph padding)")
    p.add_argument("--atol", type=float, default=2e-2, help="max |diff| to the fp32 reference for a valid config")
    p.add_argument("--max-configs", type=int, default=0, help="only the first N grid configs (0 = all)")
    return p.parse_args()


def main():
    args = parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --dry-run for the CPU smoke test")
    t0 = time.time()

    def log(r):
        msg = r.get("error") or f"{r['ms'] * 1e3:9.1f} us {r.get('pct_copy', float('nan')):6.1f}% diff {r['max_abs_diff']:.1e}"
        print(f"B={r['batch']:<4} ctx={r['context']:<5} {r['name']:<40} {msg}", file=sys.stderr, flush=True)

    dims = TINY if args.dry_run else QWEN3_8B
    rows, copy_bw, main_shapes, split_shapes = run(args, log)
    text, summary = report(rows, copy_bw, main_shapes, split_shapes, dims)
    print(text)
    meta = {
        "gpu": "cpu-interpreter" if args.dry_run else torch.cuda.get_device_name(),
        "versions": versions(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dims": dict(zip(("q_heads", "kv_heads", "head_dim", "block_size"), dims)), "dtype": "bfloat16",
        "copy_gbps": copy_bw, "seconds": time.time() - t0,
        "current_decode_configs": {str(k): v for k, v in pa.DECODE_CONFIGS.items()}, "current_split_k": pa.SPLIT_K,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"metadata": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out} ({time.time() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
