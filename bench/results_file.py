"""What the bench scripts write next to their figures: ``write_result(path, result)`` and
``versions()``, the one record of what a measurement ran on (every script's results carry it);
and ``decode_step_ms(rank)``, how those who read a bench_decode record find its step."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: Path | None, result: dict) -> None:
    """Write ``result`` as indented JSON to ``path`` (folders made as needed) and say so; nothing
    when ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def versions() -> dict:
    """Python, torch (CUDA, NCCL), transformers, Triton and adp-pass versions: the cost model's
    calibration records the same (``adp_pass.calibrate.versions``)."""
    from adp_pass.calibrate import versions as installed  # torch: only when a result is made

    return installed()


def decode_step_ms(rank: dict) -> float | None:
    """A bench_decode rank record's mean decode step: top level in older records, per phase in
    newer ones (the first phase that decoded)."""
    if rank.get("mean_decode_step_ms"):
        return rank["mean_decode_step_ms"]
    phases = [p for p in rank.get("phases", []) if p.get("mean_decode_step_ms")]
    return phases[0]["mean_decode_step_ms"] if phases else None
