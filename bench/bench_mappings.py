"""The seed's table, measured: each mapping built once, several workloads served on it.

    python bench/bench_mappings.py --preset qwen3-8b --gpus 2 \\
        --out bench/results/mappings-qwen3-8b-2.json

Mappings (default for N GPUs): TP1 (one GPU), TP-N, attention-DP replicated, attention-DP +
mlp_tp=N, and for N=4 also mlp_tp=2 and attn_tp=2. Workloads: requests per GPU x prompt
length (``--workloads 64x512,256x512``), ``--new-tokens`` each. Per row: mean decode step
(TPOT), tokens/s per GPU and in total, mean TTFT, peak memory per GPU, KV capacity, the step
time over the HBM roofline (weights + KV bytes a step reads / measured copy bandwidth) and the
cost model's prediction. A mapping whose weights + KV cache do not fit is reported as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from adp_pass.cost_model import load_calibration, predict
from adp_pass.mapping import Mapping
from model_flags import add_model_flags, resolve_model  # bench/ is the script's dir
from adp_pass.runtime.frontend import assign_by_load, make_job, run_job, synthetic_requests
from adp_pass.runtime.contract import to_json
from adp_pass.runtime.serving_config import ServingConfig
from adp_pass.runtime.sampling import SamplingParams

BLOCK = 16


def default_mappings(gpus: int) -> list[str]:
    specs = ["tp=1", f"tp={gpus},attn_dp=0", f"tp={gpus},attn_dp=1",
             f"tp={gpus},attn_dp=1,mlp_tp={gpus}"]
    if gpus == 4:
        specs += ["tp=4,attn_dp=1,mlp_tp=2", "tp=4,attn_dp=1,attn_tp=2"]
    return specs


def copy_bandwidth_gbps() -> float | None:
    """Device-to-device copy rate, bytes read + written (the roofline's denominator)."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, runs = time.perf_counter(), 10
    for _ in range(runs):
        dst.copy_(src)
    torch.cuda.synchronize()
    rate = 2 * src.numel() * runs / (time.perf_counter() - start) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return rate


def run_mapping(spec: str, args, config, workloads: list[tuple[int, int]], log_dir: Path) -> list:
    mapping = Mapping.load(spec)
    ranks = mapping.tp_size
    gpus = ranks
    group_ranks = ranks // mapping.dp_size  # ranks serving one request set
    seq_max = max(p for _, p in workloads) + args.new_tokens
    per_group = max(b for b, _ in workloads) * group_ranks  # requests one DP group serves
    blocks = -(-seq_max // BLOCK) * per_group + 8
    params = SamplingParams(max_new_tokens=args.new_tokens)
    phases = []
    for index, (batch, prompt) in enumerate(workloads):
        requests = synthetic_requests(batch * gpus, prompt, params, config.vocab_size, seed=index)
        phases.append(assign_by_load(requests, mapping.dp_size))
    sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if s < per_group}
                   | {per_group})
    serving = ServingConfig(num_blocks=blocks, block_size=BLOCK, max_position=seq_max + 16,
                            max_seq_len=seq_max, max_batch=per_group,
                            cuda_graph_sizes=tuple(sizes), kv_cache_dtype=args.kv_cache_dtype)
    job = make_job(mapping, phases[0], workloads=phases[1:], preset=args.preset,
                   checkpoint=str(args.checkpoint) if args.checkpoint else None,
                   layers=args.job_layers, dtype=args.dtype, serving=serving,
                   check_first_step=not args.no_check)
    print(f"\n== {spec}: {ranks} rank(s), {per_group} requests per DP group at most, "
          f"{blocks} KV blocks per rank", flush=True)
    try:
        report = run_job(job, ranks, timeout_s=args.timeout,
                         log_path=log_dir / f"{spec.replace(',', '_').replace('=', '')}.log")
    except Exception as err:  # noqa: BLE001 - a mapping that fails is a row, not the end
        print(f"   failed: {err}", flush=True)
        return [{"mapping": spec, "error": str(err), "batch_per_gpu": b, "prompt": p}
                for b, p in workloads]
    leaders = report.leaders
    rows = []
    for index, (batch, prompt) in enumerate(workloads):
        phase = [r.phases[index] for r in leaders]
        step = sum(p.mean_decode_step_ms for p in phase) / len(phase)
        tokens = sum(p.decode_tokens_per_s for p in phase)
        rows.append({
            "mapping": spec, "gpus": gpus, "batch_per_gpu": batch, "prompt": prompt,
            "new_tokens": args.new_tokens, "step_ms": step, "tok_s_total": tokens,
            "tok_s_per_gpu": tokens / gpus,
            "ttft_ms": sum(p.mean_ttft_ms for p in phase) / len(phase),
            "memory_gib_per_gpu": max(r.memory_allocated_gib or 0 for r in report.ranks),
            "kv_capacity_seqs_per_group": blocks // -(-seq_max // BLOCK),
            "first_step_check": to_json(leaders[0].first_step_check),
            "build_s": sum(leaders[0].timings.values()),
            "fits": True,
        })
        print(f"   {batch:>4} x {prompt:<5} step {step:7.2f} ms  {tokens / gpus:9.0f} tok/s/GPU  "
              f"TTFT {rows[-1]['ttft_ms']:8.0f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-8b")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--mappings", default=None, help="comma-free list separated by ';'")
    parser.add_argument("--workloads", default="64x512,256x512")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calibration", default=None)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--no-check", action="store_true",
                        help="skip the first step's parity check against transformers (it holds "
                        "a bf16 and an fp32 copy of the weights: too much for Qwen3-32B)")
    add_model_flags(parser)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    config = resolve_model(parser, args)
    workloads = [tuple(int(x) for x in w.split("x")) for w in args.workloads.split(",")]
    specs = args.mappings.split(";") if args.mappings else default_mappings(args.gpus)
    calibration = load_calibration(args.calibration)
    bandwidth = copy_bandwidth_gbps()
    memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    log_dir = args.out.parent / (args.out.stem + "-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    for spec in specs:
        measured = run_mapping(spec, args, config, workloads, log_dir)
        for row in measured:
            prediction = predict(config, spec, batch_per_gpu=row["batch_per_gpu"],
                                 prompt=row["prompt"], new_tokens=args.new_tokens,
                                 calibration=calibration, gpu_memory_bytes=memory,
                                 weights=args.weights,
                                 kv_cache=args.kv_cache)
            row.update(model=args.preset, predicted_step_ms=prediction.step_ms,
                       predicted_tok_s_per_gpu=prediction.tok_s_per_gpu)
            if "error" in row:
                row.update(fits=False if "InsufficientMemory" in row["error"] or "too little"
                           in row["error"] else None, step_ms=None, tok_s_per_gpu=None)
            if bandwidth and row.get("step_ms"):
                read = prediction.weights_bytes_per_gpu + prediction.kv_bytes_per_gpu
                row["roofline_ms"] = read / (bandwidth * 1e9) * 1e3
                row["step_over_roofline"] = row["step_ms"] / row["roofline_ms"]
            rows.append(row)
        args.out.write_text(json.dumps(_document(args, rows, bandwidth, started), indent=1))
    print(f"\nwrote {args.out}")


def _document(args, rows: list, bandwidth: float | None, started: float) -> dict:
    import transformers
    import triton

    return {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "copy_bandwidth_gbps": bandwidth,
        "weights": args.weights, "kv_cache_dtype": args.kv_cache_dtype,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        # how lockstep groups stepped (check_cost_model.py predicts older files in step)
        "lockstep": "ahead",
        "rows": rows,
    }


if __name__ == "__main__":
    main()
