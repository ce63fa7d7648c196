"""A markdown table of bench_decode.py results (the JSON files given or found in a folder):
GPU, model, weights, KV cache, requests x prompt, decode step, tokens/s, the step's roofline and
the cost model's prediction, as docs/benchmarks.md shows them.

    python bench/summarize_decode.py OUT_DIR [more files or folders ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from results_file import decode_step_ms


def rows(paths: list[Path]) -> list[dict]:
    found = []
    for path in paths:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            data = json.loads(file.read_text())
            if "ranks" not in data or "roofline" not in data:
                continue  # not a bench_decode result
            settings, roof = data.get("settings", {}), data["roofline"]
            steps = [s for s in map(decode_step_ms, data["ranks"]) if s]
            step = sum(steps) / len(steps) if steps else float("nan")
            found.append({
                "file": file.name, "gpu": data.get("gpu", "?"),
                "model": settings.get("preset", "?"),
                "weights": settings.get("weights", "bf16"), "kv": settings.get("kv_cache", "bf16"),
                "requests": settings.get("requests_per_rank", "?"),
                "prompt": settings.get("prompt_len", "?"), "step_ms": step,
                "tok_s": data.get("total_decode_tokens_per_s", float("nan")),
                "roofline_ms": roof.get("roofline_ms", float("nan")),
                "predicted_ms": roof.get("predicted_step_ms", float("nan")),
                "prefill_tok_s": _prefill_tokens_per_s(data["ranks"]),
                # Runs before the prompt warm-up existed counted Triton's compiles in the prefill.
                "warmed": any("prompt_warmup_s" in p for r in data["ranks"]
                              for p in r.get("phases", [])),
            })
    return found


def _prefill_tokens_per_s(ranks: list[dict]) -> float:
    """The first workload's prompt tokens over its prefill time, summed over the ranks."""
    phases = [r["phases"][0] for r in ranks if r.get("phases")]
    seconds = max((p.get("prefill_s", 0.0) for p in phases), default=0.0)
    return sum(p.get("prefill_tokens", 0) for p in phases) / seconds if seconds else float("nan")


def table(found: list[dict]) -> str:
    lines = ["| GPU | model | weights | KV | requests x prompt | step ms | decode tok/s | roofline ms "
             "| step / roofline | cost model ms | prefill tok/s | file |", "|---" * 12 + "|"]
    for r in found:
        prefill = f"{r['prefill_tok_s']:,.0f}" + ("" if r["warmed"] else " (no warm-up)")
        lines.append(
            f"| {r['gpu']} | {r['model']} | {r['weights']} | {r['kv']} | {r['requests']} x "
            f"{r['prompt']} | {r['step_ms']:.2f} | {r['tok_s']:,.0f} | {r['roofline_ms']:.2f} | "
            f"{r['step_ms'] / r['roofline_ms']:.2f} | {r['predicted_ms']:.2f} | {prefill} | "
            f"{r['file']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table(rows([Path(p) for p in sys.argv[1:]])))
