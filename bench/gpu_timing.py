"""Timing on the GPU for the bench scripts: ``graph_ms(graph, replays)``."""

from __future__ import annotations

import torch


def graph_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Milliseconds per replay of ``graph``, over ``replays`` back-to-back replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays
