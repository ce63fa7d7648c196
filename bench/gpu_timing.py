"""The bench scripts' one timer: ``median_ms(fn)``, ``loop_ms(fn, iters)``, ``graph_ms(graph)``.

Every script times through these, so a figure means the same thing in every results file:
``median_ms`` is Triton's ``do_bench_cudagraph`` (launch overhead excluded, data L2-resident) or
``do_bench`` (L2 flushed between runs), median; on CPU (the interpreter's dry runs) the median
wall time of a few calls. ``loop_ms`` and ``graph_ms`` are the mean over back-to-back calls or
replays between two CUDA events.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], *, cudagraph: bool = True, rep: int = 100,
              warmup: int = 25, wall: bool = False, wall_calls: int = 3) -> float:
    """Median milliseconds per call of ``fn``; ``wall``: the wall clock over ``wall_calls``
    calls (CPU dry runs)."""
    if wall:
        samples = []
        for _ in range(wall_calls):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    import triton.testing

    fn()  # compile / autotune outside any graph capture
    torch.cuda.synchronize()
    if cudagraph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def loop_ms(fn: Callable[[int], object], iters: int) -> float:
    """Milliseconds per call of ``fn(i)``, ``i`` in ``range(iters)``, run back to back."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Milliseconds per replay of ``graph``, over ``replays`` back-to-back replays."""
    return loop_ms(lambda _: graph.replay(), replays)
