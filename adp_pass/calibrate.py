"""Measure this machine's constants for the cost model (``adp calibrate``).

What is measured, on device 0 unless said otherwise (GPU sizes; a CPU-only machine runs the
same code at small sizes, with gloo ranks, so that it can be tested anywhere):

* ``copy_bandwidth_gbps``: a 1 GiB device-to-device copy, bytes read + written / time.
* ``gemm_tflops``: bf16 ``[tokens x 4096] @ [4096 x 16384]`` for 64, 256 and 1024 tokens,
  2 * tokens * 4096 * 16384 / time.
* ``attention_bandwidth_gbps``: decode attention (one query token per sequence) over a long KV,
  bytes of K and V / time: the project's paged kernel
  (``adp_pass.runtime.kernels.paged_attention.paged_decode_attention``) on a GPU, falling back to
  ``scaled_dot_product_attention``; both figures are kept when measured.
* ``kernel_launch_us``: one small elementwise kernel inside a CUDA graph (eager on a CPU).
* ``allreduce`` / ``allgather`` / ``reducescatter``: for each group size g = 2..N, the ranks
  split into consecutive groups of g that run at once (as a mapping's groups do; ranks left over
  wait), each timing 16 KiB, 1 MiB and 16 MiB messages. ``latency_us`` is the time of the
  smallest; ``bus_bandwidth_gbps`` the least-squares slope of the others over NCCL's bus bytes
  (all-reduce 2(g-1)/g of the buffer, all-gather / reduce-scatter (g-1)/g of the gathered size).
  Ranks are started by torchrun's machinery (``adp_pass.launch``): NCCL on GPUs, gloo on a CPU.
  Every collective is bounded by the process group's timeout, so a lost rank fails the job
  instead of hanging it.

* ``gemm_tflops_fp8``: the same reference GEMM in FP8 (``torch._scaled_mm``, row-wise scales:
  the block-scaled kernels' own cost is ``fp8_gemm_efficiency`` in the profile), when the GPU
  and torch build have it.
* ``gemm_shapes``: the rate on the TP shard shapes of Qwen3-8B and Qwen3-32B (q|k|v, o,
  gate|up, down for tp 1, 2, 4, 8) at 64-4096 tokens, bf16 and FP8: a TP-8 shard is a narrow
  GEMM, and the cost model takes these over its wave law where they exist.
* ``lockstep_agree_us``: the per-step host agreement of a lockstep group (runtime/lockstep.py: a
  gloo all-reduce MAX of a few int64) for each group size.

Not measured, carried over from the profile of this GPU (``adp_pass/data/<gpu>.json``; the
H200's when none matches) and named in ``notes``: ``kernels_per_layer``, ``step_overhead_us``,
``memory_reserve_gib``. ``adp plan --gpu FILE`` lays the result over that profile;
``python -m adp_pass.profiles fold NAME FILE OUT`` makes it the packaged profile's measured
block.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from adp_pass import fp8
from adp_pass.cost_model import GB, GIB, OPS
from adp_pass.profiles import DEFAULT_PROFILE, load_profile_data, profile_for_device

CARRIED = ("kernels_per_layer", "step_overhead_us", "memory_reserve_gib")
# NVLink multicast stays off on the shared machines (device notes); a child inherits these.
_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
             "NVSHMEM_DISABLE_NVLS": "1"}

GPU_SIZES: dict[str, Any] = {
    "copy_bytes": 1 << 30,
    "gemm_hidden": 4096,
    "gemm_tokens": (64, 256, 1024),
    "attention": {"batch": 64, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "context": 4096},
    "small_kernel": (64, 4096),
    "collective_bytes": (16 << 10, 1 << 20, 16 << 20),
    "warmup": 5, "iters": 20, "repeats": 3,
    "shape_models": ("qwen3-8b", "qwen3-32b"),
    "shape_tp": (1, 2, 4, 8),
    "shape_tokens": (64, 256, 512, 1024, 2048, 4096),
}
CPU_SIZES: dict[str, Any] = {
    "copy_bytes": 32 << 20,
    "gemm_hidden": 256,
    "gemm_tokens": (64, 256, 1024),
    "attention": {"batch": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 64, "context": 1024},
    "small_kernel": (64, 256),
    "collective_bytes": (4 << 10, 64 << 10, 1 << 20),
    "warmup": 2, "iters": 3, "repeats": 2,
    "shape_models": ("tiny",),
    "shape_tp": (1, 2),
    "shape_tokens": (64,),
}
_FACTOR = {"allreduce": lambda g: 2 * (g - 1) / g, "allgather": lambda g: (g - 1) / g,
           "reducescatter": lambda g: (g - 1) / g}


def _stderr(line: str) -> None:
    print(f"adp calibrate: {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int,
          repeats: int, before: Callable[[], Any] | None = None, graph: bool = False) -> float:
    """Seconds per call of ``fn``: the median over ``repeats`` of the mean of ``iters`` calls
    (CUDA events on a GPU, the wall clock on a CPU), after ``warmup`` calls. ``graph``: on a GPU
    the ``iters`` calls are captured in one CUDA graph and replayed, as the runtime's decode step
    replays its GEMMs: a call of a few microseconds launched from Python is timed at the host's
    launch rate instead (one H100, 2026-12-07: 4096 x 4096 bf16 at 64 tokens, 19.6 us a call
    eagerly, where a graph streams it from HBM in 14.6)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if graph and device.type == "cuda":
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(iters):
                fn()
        captured.replay()  # the first replay uploads the graph
        seconds = timed(captured.replay, device, warmup=0, iters=1, repeats=repeats,
                        before=before)
        return seconds / iters
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            begin = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - begin) / iters)
    return sorted(times)[len(times) // 2]


def _timing(sizes: dict) -> dict:
    return {k: sizes[k] for k in ("warmup", "iters", "repeats")}


# ----------------------------------------------------------------------------- one device
def measure_copy(device: torch.device, sizes: dict) -> float:
    """Device-to-device copy bandwidth, GB/s counting bytes read and written."""
    nbytes = sizes["copy_bytes"]
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, **_timing(sizes))
    return 2 * nbytes / seconds / GB


def measure_gemm(device: torch.device, sizes: dict) -> dict[str, float]:
    """bf16 ``[tokens x H] @ [H x 4H]`` in TFLOP/s, by token count."""
    hidden = sizes["gemm_hidden"]
    weights = _weights_past_l2(4 * hidden, hidden, device)
    rates = {}
    for tokens in sizes["gemm_tokens"]:
        x = torch.randn(tokens, hidden, device=device).to(torch.bfloat16)
        seconds = timed(_rotating(lambda w, x=x: torch.mm(x, w.t()), weights), device,
                        graph=True, **_timing(sizes))
        rates[str(tokens)] = 2 * tokens * hidden * 4 * hidden / seconds / 1e12
    return rates


def _weights_past_l2(n: int, k: int, device: torch.device, timed_bytes: int = 2
                     ) -> list[torch.Tensor]:
    """bf16 copies of an ``[n, k]`` weight (the layout ``nn.Linear`` and the runtime hold),
    enough for their bytes, at ``timed_bytes`` an element as timed (1: an FP8 caller quantizes
    them), to exceed twice the L2 cache: the timed calls take them in turn, so each reads its
    weight from HBM as a decode step does, not from the L2 the previous call filled (one H100,
    2026-12-07: 4096 x 4096 bf16 at 64 tokens timed alone ran at 3.6 TB/s, above copy bandwidth)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) \
        if device.type == "cuda" else 0
    copies = max(1, min(64, -(-2 * l2 // (n * k * timed_bytes))))
    return [torch.randn(n, k, device=device).to(torch.bfloat16) for _ in range(copies)]


def _rotating(call: Callable[[torch.Tensor], Any], weights: list) -> Callable[[], Any]:
    """``call`` on each of ``weights`` in turn, one a call (see ``_weights_past_l2``)."""
    turn = itertools.cycle(weights)
    return lambda: call(next(turn))


def _fp8_mm(tokens: int, n: int, k: int, device: torch.device) -> Callable[[], Any] | None:
    """A [tokens x k] @ [k x n] FP8 product through ``torch._scaled_mm`` (row-wise scales), or
    None where this GPU or torch build has no FP8 GEMM."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    try:
        a = torch.randn(tokens, k, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn).t()  # column-major
        sa = torch.ones(tokens, 1, device=device)
        sb = torch.ones(1, n, device=device)
        fn = lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb,  # noqa: E731
                                      out_dtype=torch.bfloat16)
        fn()
        return fn
    except (RuntimeError, TypeError, AttributeError):
        return None


def _fp8_block_linear(device: torch.device) -> Callable | None:
    """The runtime's block-scaled W8A8 linear on an activation already quantized, as the lowered
    decode layer calls it after a fused producer (``adp::fp8_block_linear_quantized``, with the
    Triton / cuBLAS kernel its dispatch picks per shape), or None on a CPU or where the kernels do
    not load: the shard shapes' FP8 rates are this op's, not cuBLAS row-wise ``_scaled_mm``'s."""
    if device.type != "cuda":
        return None
    try:
        import adp_pass.runtime.kernels.fp8_gemm  # noqa: F401  (registers the CUDA kernels)
    except ImportError:
        return None
    return torch.ops.adp.fp8_block_linear_quantized


def measure_gemm_fp8(device: torch.device, sizes: dict) -> dict[str, float]:
    """The reference GEMM in FP8, TFLOP/s by token count ({} without FP8 GEMMs)."""
    hidden = sizes["gemm_hidden"]
    rates = {}
    for tokens in sizes["gemm_tokens"]:
        fn = _fp8_mm(tokens, 4 * hidden, hidden, device)
        if fn is None:
            return {}
        seconds = timed(fn, device, graph=True, **_timing(sizes))
        rates[str(tokens)] = 2 * tokens * hidden * 4 * hidden / seconds / 1e12
    return rates


def shard_shapes(models: tuple[str, ...], tps: tuple[int, ...]) -> list[tuple[int, int]]:
    """(n, k) of every linear of each model's TP shard (q|k|v, o, gate|up, down) for each tp
    that divides it: the shapes the cost model asks rates of."""
    from adp_pass.cost_model import ModelShape
    from adp_pass.presets import PRESETS

    shapes: set[tuple[int, int]] = set()
    for name in models:
        s = ModelShape.of(PRESETS[name])
        for tp in tps:
            if s.heads % tp or s.intermediate % tp:
                continue
            kv = -(-s.kv_heads // tp)
            shapes |= {((s.heads // tp + 2 * kv) * s.head_dim, s.hidden),
                       (s.hidden, s.heads * s.head_dim // tp),
                       (2 * s.intermediate // tp, s.hidden), (s.hidden, s.intermediate // tp)}
    return sorted(shapes)


def measure_gemm_shapes(device: torch.device, sizes: dict,
                        progress: Callable[[str], None]) -> dict[str, dict]:
    """{"bf16": {"NxK": {tokens: TFLOP/s}}, "fp8": {...}} on the TP shard shapes."""
    out: dict[str, dict] = {"bf16": {}, "fp8": {}}
    shapes = shard_shapes(sizes["shape_models"], sizes["shape_tp"])
    fp8_linear = _fp8_block_linear(device)
    for n, k in shapes:
        # As the runtime runs them: x @ W.T over an [n, k] weight (cuBLAS picks its kernel by
        # layout), each call on a weight the L2 does not hold
        weights = _weights_past_l2(n, k, device)
        fp8_weights = [fp8.quantize_weight(w) for w in _weights_past_l2(n, k, device, 1)
                       ] if fp8_linear else []
        for tokens in sizes["shape_tokens"]:
            x = torch.randn(tokens, k, device=device).to(torch.bfloat16)
            seconds = timed(_rotating(lambda w, x=x: torch.mm(x, w.t()), weights), device,
                            graph=True, **_timing(sizes))
            out["bf16"].setdefault(f"{n}x{k}", {})[str(tokens)] = round(
                2 * tokens * n * k / seconds / 1e12, 3)
            if fp8_linear:
                x_fp8, x_scale = fp8.quantize_activation(x)  # a fused producer's output
                try:
                    seconds = timed(_rotating(lambda w, a=x_fp8, s=x_scale: fp8_linear(
                        a, s, *w, torch.bfloat16), fp8_weights), device, graph=True,
                        **_timing(sizes))
                except (RuntimeError, ValueError) as err:  # the bf16 table stays worth having
                    progress(f"FP8 shard shapes not measured: {err!r:.200}")
                    fp8_linear, out["fp8"] = None, {}
                    continue
                out["fp8"].setdefault(f"{n}x{k}", {})[str(tokens)] = round(
                    2 * tokens * n * k / seconds / 1e12, 3)
    progress(f"GEMM on {len(shapes)} shard shapes x {len(sizes['shape_tokens'])} token counts "
             f"(bf16{', fp8' if out['fp8'] else ''})")
    return {k: v for k, v in out.items() if v}


def _kv_bytes(a: dict) -> int:
    return 2 * a["batch"] * a["kv_heads"] * a["context"] * a["head_dim"] * 2  # K + V, bf16


def measure_attention_sdpa(device: torch.device, sizes: dict) -> float:
    """``scaled_dot_product_attention`` with one query token over ``context`` cached tokens:
    bytes of K and V / time, GB/s."""
    a = sizes["attention"]
    dtype = torch.bfloat16
    k = torch.randn(a["batch"], a["kv_heads"], a["context"], a["head_dim"], device=device,
                    dtype=dtype)
    v = torch.randn_like(k)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(a["batch"], a["q_heads"], 1, a["head_dim"], device=device, dtype=dtype)
    try:
        sdpa(q, k, v, enable_gqa=True)
        fn = lambda: sdpa(q, k, v, enable_gqa=True)  # noqa: E731
    except (TypeError, RuntimeError):  # no GQA in this build: one query head per kv head
        q = q[:, : a["kv_heads"]].contiguous()
        fn = lambda: sdpa(q, k, v)  # noqa: E731
    seconds = timed(fn, device, **_timing(sizes))
    return _kv_bytes(a) / seconds / GB


def paged_attention_inputs(device: torch.device, attention: dict, block_size: int = 16) -> tuple:
    """(q, k_cache, v_cache, block_tables, context_lens, scale) for the paged decode kernel:
    every sequence ``context`` tokens long in its own consecutive blocks."""
    a = attention
    blocks_per_seq = math.ceil(a["context"] / block_size)
    num_blocks = a["batch"] * blocks_per_seq
    dtype = torch.bfloat16
    k_cache = torch.randn(num_blocks, block_size, a["kv_heads"], a["head_dim"], device=device,
                          dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(a["batch"], a["q_heads"], a["head_dim"], device=device, dtype=dtype)
    block_tables = torch.arange(num_blocks, device=device, dtype=torch.int32).view(
        a["batch"], blocks_per_seq)
    context_lens = torch.full((a["batch"],), a["context"], device=device, dtype=torch.int32)
    return q, k_cache, v_cache, block_tables, context_lens, a["head_dim"] ** -0.5


def measure_attention_paged(device: torch.device, sizes: dict, fp8: bool = False) -> float:
    """The project's paged decode kernel at the same shape as the SDPA measurement, GB/s of the
    K and V bytes it reads; ``fp8``: over a float8_e4m3fn cache (one byte an element, read with
    its per-tensor scales), as ``--kv-cache-dtype fp8`` serves."""
    from adp_pass.runtime.kernels.paged_attention import paged_decode_attention

    q, k_cache, v_cache, tables, lens, scale = paged_attention_inputs(device, sizes["attention"])
    scales = {}
    if fp8:
        k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
        one = torch.ones(1, dtype=torch.float32, device=device)
        scales = {"k_scale": one, "v_scale": one.clone()}
    seconds = timed(lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                                   **scales), device, **_timing(sizes))
    return _kv_bytes(sizes["attention"]) // (2 if fp8 else 1) / seconds / GB


def measure_kernel_launch(device: torch.device, sizes: dict) -> tuple[float, str]:
    """Microseconds of one small elementwise kernel: inside a CUDA graph of 100 on a GPU (how
    the decode step runs), in an eager loop on a CPU. Returns (us, how)."""
    x = torch.zeros(*sizes["small_kernel"], device=device, dtype=torch.bfloat16)
    if device.type == "cuda":
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    x.add_(1)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph, count = torch.cuda.CUDAGraph(), 100
            with torch.cuda.graph(graph):
                for _ in range(count):
                    x.add_(1)
            seconds = timed(graph.replay, device, **_timing(sizes))
            return seconds / count * 1e6, "cuda graph of 100 adds"
        except RuntimeError:
            pass
    seconds = timed(lambda: x.add_(1), device, **_timing(sizes))
    return seconds * 1e6, "eager add"


# ----------------------------------------------------------------------------- collectives
def _collective_fn(op: str, nbytes: int, group_size: int, group, device, dtype):
    item = torch.empty((), dtype=dtype).element_size()
    numel = max(group_size, nbytes // item // group_size * group_size)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if op == "allreduce":
        buf = torch.zeros(numel, device=device, dtype=dtype)
        return lambda: dist.all_reduce(buf, group=group), numel * item
    if op == "allgather":
        out = torch.zeros(numel, device=device, dtype=dtype)
        inp = torch.zeros(numel // group_size, device=device, dtype=dtype)
        return lambda: gather(out, inp, group=group), numel * item
    out = torch.zeros(numel // group_size, device=device, dtype=dtype)
    inp = torch.zeros(numel, device=device, dtype=dtype)
    return lambda: scatter(out, inp, group=group), numel * item


def fit_collective(op: str, group_size: int, points: list[list[float]]) -> dict:
    """latency_us = the smallest message's time (or a larger one's, if smaller: noise);
    bus_bandwidth_gbps = 1 / the least-squares
    slope, through that latency, of the larger messages' times over their bus bytes."""
    points = sorted(points)
    latency = min(t for _, t in points)  # the smallest message's time, unless noise beat it
    xs = [_FACTOR[op](group_size) * b for b, _ in points[1:]]
    ys = [(t - latency) * 1e-6 for _, t in points[1:]]
    slope = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs) if xs else 0.0
    if slope <= 0:  # noise larger than the transfer: the best rate seen
        bandwidth = max(x / (t * 1e-6) for x, (_, t) in zip(xs, points[1:])) if xs else 1.0
    else:
        bandwidth = 1 / slope
    return {"latency_us": round(latency, 3), "bus_bandwidth_gbps": round(bandwidth / GB, 3),
            "points_bytes_us": [[int(b), round(t, 3)] for b, t in points]}


def collectives_rank(sizes: dict) -> dict | None:
    """Entry point of each rank: time every collective for every group size; rank 0 returns
    the table."""
    from adp_pass.launch import init_rank

    rank, world, device = init_rank()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict[str, dict] = {op: {} for op in OPS}
    results["lockstep_agree_us"] = {}
    for size in range(2, world + 1):
        chunks = [list(range(s, s + size)) for s in range(0, world - size + 1, size)]
        groups = [dist.new_group(chunk) for chunk in chunks]  # every rank makes every group
        hosts = [dist.new_group(chunk, backend="gloo") for chunk in chunks]
        mine = next((g for c, g in zip(chunks, groups) if rank in c), None)
        host = next((g for c, g in zip(chunks, hosts) if rank in c), None)
        if host is not None:  # the lockstep agreement: runtime/lockstep.py's call, timed
            values = torch.zeros(4, dtype=torch.int64)
            for _ in range(sizes["warmup"] * 4):
                dist.all_reduce(values, op=dist.ReduceOp.MAX, group=host)
            runs = []
            for _ in range(sizes["repeats"]):
                begin = time.perf_counter()
                for _ in range(sizes["iters"] * 5):
                    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=host)
                runs.append((time.perf_counter() - begin) / (sizes["iters"] * 5) * 1e6)
            results["lockstep_agree_us"][str(size)] = round(sorted(runs)[len(runs) // 2], 2)
            if rank == 0:
                _stderr(f"lockstep agreement over {size} ranks (gloo): "
                        f"{results['lockstep_agree_us'][str(size)]:.1f} us")
        if mine is not None:
            flag = torch.zeros(1, device=device, dtype=dtype)

            def sync(group=mine, token=flag):
                dist.all_reduce(token, group=group)
                _sync(device)

            for op in OPS:
                points = []
                for nbytes in sizes["collective_bytes"]:
                    fn, actual = _collective_fn(op, nbytes, size, mine, device, dtype)
                    sync()
                    seconds = timed(fn, device, before=sync, **_timing(sizes))
                    points.append([actual, seconds * 1e6])
                results[op][str(size)] = fit_collective(op, size, points)
                if rank == 0:
                    r = results[op][str(size)]
                    _stderr(f"{op} over {size} ranks ({len(chunks)} group"
                            f"{'s' * (len(chunks) != 1)} at once): latency "
                            f"{r['latency_us']:.1f} us, bus bandwidth "
                            f"{_num(r['bus_bandwidth_gbps'])} GB/s")
        token = torch.zeros(1, device=device, dtype=dtype)
        dist.all_reduce(token)
        _sync(device)
    dist.destroy_process_group()
    return results if rank == 0 else None


# ----------------------------------------------------------------------------- the whole job
def versions() -> dict:
    """What a measurement ran on: Python, torch (and CUDA, NCCL), transformers, Triton,
    adp-pass (benchmarks record it next to their figures)."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for package in ("transformers", "triton", "adp-pass"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() \
            else None
    except (AttributeError, RuntimeError, TypeError):
        out["nccl"] = None
    return out


def _device_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 16.0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def calibrate(gpus: int, *, sizes: dict | None = None, timeout_s: float = 120.0,
              progress: Callable[[str], None] = _stderr) -> dict:
    """Measure every constant of the cost model on this machine (``gpus`` ranks for the
    collectives: GPUs, or gloo ranks on a CPU-only machine) and return the calibration dict."""
    from adp_pass.launch import launch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sizes = sizes or (GPU_SIZES if cuda else CPU_SIZES)
    started = time.perf_counter()
    profile = profile_for_device(_device_name(device)) or DEFAULT_PROFILE
    defaults, provenance, _, _ = load_profile_data(profile)
    notes = {}
    for key in CARRIED:
        why = provenance.get(key, {}).get("from")
        notes[key] = f"not measured: carried over from the {profile} profile" + (
            f" ({why})" if why else "")
    if cuda:
        torch.cuda.set_device(device)

    progress(f"{_device_name(device)}: copy bandwidth ({sizes['copy_bytes'] / GIB:.2f} GiB) ...")
    copy = measure_copy(device, sizes)
    progress(f"copy bandwidth {_num(copy)} GB/s; GEMM bf16 at {list(sizes['gemm_tokens'])} "
             "tokens ...")
    gemm = measure_gemm(device, sizes)
    progress("GEMM " + ", ".join(f"{t} tokens {_num(r)} TFLOP/s" for t, r in gemm.items())
             + "; FP8 ...")
    gemm_fp8 = measure_gemm_fp8(device, sizes)
    if not gemm_fp8:
        notes["gemm_tflops_fp8"] = "no FP8 GEMM on this device / torch build: not measured"
    shapes = measure_gemm_shapes(device, sizes, progress) if cuda else {}
    if not cuda:
        notes["gemm_shapes"] = "shard shapes are measured on a GPU only"
    progress("decode attention ...")
    sdpa = measure_attention_sdpa(device, sizes)
    paged, kernel = None, "scaled_dot_product_attention"
    if cuda:
        try:
            paged = measure_attention_paged(device, sizes)
            kernel = "paged_decode_attention"
        except Exception as err:  # noqa: BLE001 - optional: SDPA's figure stands in
            notes["attention_bandwidth_gbps"] = f"paged kernel failed ({err!r:.200}); SDPA's"
    attention = paged if paged is not None else sdpa
    attention_fp8 = None
    if cuda:
        try:
            attention_fp8 = measure_attention_paged(device, sizes, fp8=True)
        except Exception as err:  # noqa: BLE001 - optional: the bf16 figure stands in
            notes["attention_fp8_bandwidth_gbps"] = f"paged kernel on an fp8 cache failed ({err!r:.200})"
    progress(f"attention {_num(attention)} GB/s ({kernel}); small kernel ...")
    launch_us, launch_how = measure_kernel_launch(device, sizes)
    progress(f"small kernel {launch_us:.2f} us ({launch_how})")
    memory_gib = _device_memory_gib(device)
    if cuda:
        torch.cuda.empty_cache()

    tables: dict[str, dict] = {op: {} for op in OPS}
    agree: dict[str, float] = {}
    if gpus >= 2:
        for key, value in _SAFE_ENV.items():
            os.environ.setdefault(key, value)
        backend = "NCCL" if cuda else "gloo"
        progress(f"collectives on {gpus} ranks ({backend}, group sizes 2..{gpus}, messages "
                 f"{', '.join(_size(b) for b in sizes['collective_bytes'])}) ...")
        results = launch(collectives_rank, gpus, sizes, timeout_s=timeout_s)
        tables = results[0]
        agree = tables.pop("lockstep_agree_us", {})
    else:
        notes["allreduce"] = "one rank: no collective measured"

    a = sizes["attention"]
    return {
        "schema": 1,
        "source": f"measured by adp calibrate on {gpus} {'GPU' if cuda else 'CPU rank'}"
                  f"{'s' * (gpus != 1)}",
        "gpu": _device_name(device),
        "gpu_count": gpus,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device_memory_gib": round(memory_gib, 2),
        "memory_reserve_gib": defaults["memory_reserve_gib"],
        "copy_bandwidth_gbps": round(copy, 2),
        "gemm_tflops": {k: round(v, 3) for k, v in gemm.items()},
        "gemm_shape": f"bf16 [tokens x {sizes['gemm_hidden']}] @ "
                      f"[{sizes['gemm_hidden']} x {4 * sizes['gemm_hidden']}]",
        # How the GEMMs were timed: runs before this key timed them eagerly, which a small GEMM's
        # launch from Python bounds (docs/cost_model.md, the H100 calibration).
        "gemm_timer": "cuda graph of the timed calls" if device.type == "cuda" else "wall clock",
        **({"gemm_tflops_fp8": {k: round(v, 3) for k, v in gemm_fp8.items()}} if gemm_fp8
           else {}),
        **({"gemm_shapes": shapes} if shapes else {}),
        **({"lockstep_agree_us": agree} if agree else {}),
        "attention_bandwidth_gbps": round(attention, 2),
        "attention_kernel": kernel,
        **({"attention_fp8_bandwidth_gbps": round(attention_fp8, 2)} if attention_fp8 else {}),
        "attention_sdpa_bandwidth_gbps": round(sdpa, 2),
        "attention_paged_bandwidth_gbps": None if paged is None else round(paged, 2),
        "attention_shape": f"batch {a['batch']}, {a['q_heads']} q / {a['kv_heads']} kv heads, "
                           f"head_dim {a['head_dim']}, context {a['context']}, bf16",
        "kernel_launch_us": round(launch_us, 3),
        "kernel_launch_timer": launch_how,
        "kernels_per_layer": defaults["kernels_per_layer"],
        "step_overhead_us": defaults["step_overhead_us"],
        **tables,
        "seconds": round(time.perf_counter() - started, 1),
        "notes": notes,
    }


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _size(nbytes: int) -> str:
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):g} MiB"
    return f"{nbytes / (1 << 10):g} KiB"


def write_calibration(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
