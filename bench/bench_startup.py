"""Start-up time: ``adp run`` serving one request, cold (empty build cache) then warm.

Start to first token is measured from outside, as a user sees it: the wall time of an
``adp run`` process that serves one short request with one new token (the prefill's token), so
it includes Python and torch imports, the rank's start, its build or cache load, the CUDA-graph
capture and the prefill. Each rank's stage timings come from its log (``model ready: ...``).

    python bench/bench_startup.py --preset qwen3-8b --dtype bfloat16 --out bench/results/startup.json
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import versions, write_result


def run_once(args: argparse.Namespace, cache_dir: Path, log_dir: Path) -> dict:
    # The adp command itself (adp_pass.cli's main as the program, as the console script runs it).
    command = [sys.executable, "-m", "adp_pass.cli", "run", "--preset", args.preset,
               "--world-size", str(args.world_size), "--dtype", args.dtype,
               "--requests", str(args.world_size), "--prompt-len", "16", "--new-tokens", "1",
               "--cache-dir", str(cache_dir), "--log-dir", str(log_dir)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"adp run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    logs = "\n".join(p.read_text() for p in sorted(log_dir.rglob("*")) if p.is_file())
    # Each rank's timeline: "[rank 0 +12.3s] ..." lines, seconds since its process started.
    timeline = re.findall(r"\[rank \d+ \+[\d.]+s\] .*", logs)
    return {"wall_s": round(wall, 2), "ranks": timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-8b")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    scratch = Path(tempfile.mkdtemp(prefix="adp-startup-"))
    rows = {}
    for name in ("cold", "warm"):
        print(f"startup: {name} run ...", flush=True)
        rows[name] = run_once(args, scratch / "cache", scratch / f"logs-{name}")
        print(f"  {name}: {rows[name]['wall_s']:.1f} s start to first token", flush=True)
        for line in rows[name]["ranks"]:
            print(f"    {line}", flush=True)
    result = {
        "what": "wall time of `adp run` serving one 16-token request with 1 new token "
                "(start to first token), cold (empty build cache) then warm",
        "preset": args.preset, "world_size": args.world_size, "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions(),
        "command": " ".join(sys.argv),
        **rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
