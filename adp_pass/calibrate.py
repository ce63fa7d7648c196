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

Not measured, carried over from the packaged default (``adp_pass/data/h200.json``) and named in
``notes``: ``kernels_per_layer`` (a count of the lowered layer's kernels), ``step_overhead_us``
(host work per serving step) and ``memory_reserve_gib``.
"""

from __future__ import annotations

import datetime
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

from adp_pass.cost_model import GB, GIB, OPS, default_calibration_path

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
}
CPU_SIZES: dict[str, Any] = {
    "copy_bytes": 32 << 20,
    "gemm_hidden": 256,
    "gemm_tokens": (64, 256, 1024),
    "attention": {"batch": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 64, "context": 1024},
    "small_kernel": (64, 256),
    "collective_bytes": (4 << 10, 64 << 10, 1 << 20),
    "warmup": 2, "iters": 3, "repeats": 2,
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
          repeats: int, before: Callable[[], Any] | None = None) -> float:
    """Seconds per call of ``fn``: the median over ``repeats`` of the mean of ``iters`` calls
    (CUDA events on a GPU, the wall clock on a CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
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
    weight = torch.randn(hidden, 4 * hidden, device=device).to(torch.bfloat16)
    rates = {}
    for tokens in sizes["gemm_tokens"]:
        x = torch.randn(tokens, hidden, device=device).to(torch.bfloat16)
        out = torch.empty(tokens, 4 * hidden, device=device, dtype=torch.bfloat16)
        seconds = timed(lambda: torch.mm(x, weight, out=out), device, **_timing(sizes))
        rates[str(tokens)] = 2 * tokens * hidden * 4 * hidden / seconds / 1e12
    return rates


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


def measure_attention_paged(device: torch.device, sizes: dict) -> float:
    """The project's paged decode kernel at the same shape as the SDPA measurement, GB/s."""
    from adp_pass.runtime.kernels.paged_attention import paged_decode_attention

    inputs = paged_attention_inputs(device, sizes["attention"])
    seconds = timed(lambda: paged_decode_attention(*inputs), device, **_timing(sizes))
    return _kv_bytes(sizes["attention"]) / seconds / GB


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
    for size in range(2, world + 1):
        chunks = [list(range(s, s + size)) for s in range(0, world - size + 1, size)]
        groups = [dist.new_group(chunk) for chunk in chunks]  # every rank makes every group
        mine = next((g for c, g in zip(chunks, groups) if rank in c), None)
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
    defaults = json.loads(default_calibration_path().read_text())
    notes = {}
    for key in CARRIED:
        why = defaults.get("notes", {}).get(key)
        notes[key] = "not measured: carried over from the packaged default" + (
            f" ({why})" if why else "")
    if cuda:
        torch.cuda.set_device(device)

    progress(f"{_device_name(device)}: copy bandwidth ({sizes['copy_bytes'] / GIB:.2f} GiB) ...")
    copy = measure_copy(device, sizes)
    progress(f"copy bandwidth {_num(copy)} GB/s; GEMM bf16 at {list(sizes['gemm_tokens'])} "
             "tokens ...")
    gemm = measure_gemm(device, sizes)
    progress("GEMM " + ", ".join(f"{t} tokens {_num(r)} TFLOP/s" for t, r in gemm.items())
             + "; decode attention ...")
    sdpa = measure_attention_sdpa(device, sizes)
    paged, kernel = None, "scaled_dot_product_attention"
    if cuda:
        try:
            paged = measure_attention_paged(device, sizes)
            kernel = "paged_decode_attention"
        except Exception as err:  # noqa: BLE001 - optional: SDPA's figure stands in
            notes["attention_bandwidth_gbps"] = f"paged kernel failed ({err!r:.200}); SDPA's"
    attention = paged if paged is not None else sdpa
    progress(f"attention {_num(attention)} GB/s ({kernel}); small kernel ...")
    launch_us, launch_how = measure_kernel_launch(device, sizes)
    progress(f"small kernel {launch_us:.2f} us ({launch_how})")
    memory_gib = _device_memory_gib(device)
    if cuda:
        torch.cuda.empty_cache()

    tables: dict[str, dict] = {op: {} for op in OPS}
    if gpus >= 2:
        for key, value in _SAFE_ENV.items():
            os.environ.setdefault(key, value)
        backend = "NCCL" if cuda else "gloo"
        progress(f"collectives on {gpus} ranks ({backend}, group sizes 2..{gpus}, messages "
                 f"{', '.join(_size(b) for b in sizes['collective_bytes'])}) ...")
        results = launch(collectives_rank, gpus, sizes, timeout_s=timeout_s)
        tables = results[0]
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
        "attention_bandwidth_gbps": round(attention, 2),
        "attention_kernel": kernel,
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
