"""Attention-DP serving benchmark: every rank serves its own requests, launched by torchrun.

Default (the issue's setting, 2 GPUs): Qwen3-8B preset, random weights, bf16, 64 requests per
rank, prompt 512, 128 new tokens, decode steps replayed from CUDA graphs::

    python bench/bench_decode.py --out bench/results/decode-h100x2.json

FP8: ``--quantize fp8`` serves the preset's random model written as an FP8 checkpoint (the
Qwen3-FP8 format; ``--checkpoint DIR`` serves any checkpoint), ``--kv-cache-dtype fp8`` an e4m3
KV cache; the roofline then counts fp8 weights (+ scales) and KV bytes.

Prints decode tokens/s per rank and in total, the mean decode step time against the HBM
roofline (the rank's weights and the KV cache a step reads at the mean context, over the copy
bandwidth of the profile of the GPU it runs on, ``adp_pass/data/<gpu>.json``, unless
``--calibration``), the cost
model's prediction, and the first-step logits check against transformers holding the same
weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from model_flags import add_model_flags, resolve_model  # bench/ is the script's dir
from adp_pass.runtime.contract import to_json
from adp_pass.runtime.first_step import fp8_first_step_verdict
from adp_pass.runtime.frontend import assign_by_load, make_job, run_job, synthetic_requests
from adp_pass.runtime.serving_config import ServingConfig
from adp_pass.runtime.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-8b")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--requests-per-rank", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--graph-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="every request samples at this temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--no-check", action="store_true",
                        help="skip the first-step check against transformers (it holds a second "
                             "copy of the weights: Qwen3-32B on one GPU does not fit twice)")
    parser.add_argument("--calibration", default=None,
                        help="calibration JSON for the roofline's copy bandwidth and the "
                             "prediction (default: the profile of this GPU, adp_pass/data/)")
    add_model_flags(parser)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    config = resolve_model(parser, args)
    count = args.requests_per_rank * args.world_size
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature,
                            top_p=args.top_p)
    requests = synthetic_requests(count, args.prompt_len, params, config.vocab_size)
    seq_len = args.prompt_len + args.new_tokens
    blocks_per_seq = -(-seq_len // args.block_size)
    job = make_job(
        f"tp={args.world_size},attn_dp=1",
        assign_by_load(requests, args.world_size),
        preset=args.preset,
        checkpoint=str(args.checkpoint) if args.checkpoint else None,
        layers=args.job_layers,
        dtype=args.dtype,
        serving=ServingConfig(
            num_blocks=blocks_per_seq * args.requests_per_rank + 8,
            block_size=args.block_size,
            max_position=seq_len + 16,
            max_seq_len=seq_len,
            max_batch=args.requests_per_rank,
            cuda_graph_sizes=tuple(int(s) for s in args.graph_sizes.split(",") if s),
            kv_cache_dtype=args.kv_cache_dtype,
        ),
        check_first_step=not args.no_check,
    )
    depth = f" ({config.num_hidden_layers} layers)" if args.layers else ""
    print(f"bench: {args.checkpoint or args.preset}{depth} {args.dtype} (weights {args.weights}, "
          f"KV cache {args.kv_cache_dtype}), {args.world_size} ranks x "
          f"{args.requests_per_rank} requests, prompt {args.prompt_len}, {args.new_tokens} new",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    report = run_job(job, args.world_size)
    print(report)
    first_step = []
    for r in report.ranks:
        print(f"rank {r.rank} first-step logits vs transformers: {r.first_step_check}; "
              f"build {r.timings}")
        verdict = fp8_first_step_verdict(r.first_step_check) if args.weights == "fp8" else None
        if verdict is not None:
            first_step.append({"rank": r.rank, **verdict})
            print(f"rank {r.rank} first step {'within' if verdict['within'] else 'OUTSIDE'} "
                  f"{verdict['bound']}")
            print(f"rank {r.rank} {verdict['quantization_cost']}")
    roofline = roofline_row(config, args, report)
    for r in report.ranks:
        phase = r.phases[0]
        if phase.prefill_s:
            print(f"rank {r.rank} prefill {phase.prefill_tokens} tokens in {phase.prefill_s:.3f} s: "
                  f"{phase.prefill_tokens / phase.prefill_s:.0f} tokens/s (start-up prompt warm-up "
                  f"{phase.prompt_warmup_s:.1f} s, not counted)")
    print(f"roofline {roofline['roofline_ms']:.2f} ms ({roofline['weights_gb']:.1f} GB weights + "
          f"{roofline['kv_gb']:.1f} GB KV at {roofline['copy_gbps']:.0f} GB/s): step at "
          f"{roofline['roofline_fraction']:.0%} of it; cost model {roofline['predicted_step_ms']:.2f} ms")
    record = {
        "command": " ".join(sys.argv),
        "roofline": roofline,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gpu": report.ranks[0].device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "total_decode_tokens_per_s": report.total_decode_tokens_per_s,
        **({"first_step_bound": first_step} if first_step else {}),
        "wall_s": time.perf_counter() - start,
        "ranks": [{k: v for k, v in to_json(r).items() if k != "results"} for r in report.ranks],
    }
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))


def roofline_row(config, args, report) -> dict:
    """The step's memory roofline: each rank reads the weights a step uses (all but the
    embedding table, of which it gathers a few rows) and its KV cache (mean context of the
    decode) once per step, at the calibration's copy bandwidth; and the cost model's prediction
    for the same workload."""
    from adp_pass.cost_model import GB, load_calibration, predict

    calibration = load_calibration(args.calibration)
    mapping = f"tp={args.world_size},attn_dp=1"
    prediction = predict(config, mapping, batch_per_gpu=args.requests_per_rank,
                         prompt=args.prompt_len, new_tokens=args.new_tokens,
                         calibration=calibration, weights=args.weights,
                         kv_cache=args.kv_cache)
    nbytes = prediction.weights_read_bytes_per_gpu + prediction.kv_bytes_per_gpu
    roofline_ms = nbytes / (calibration["copy_bandwidth_gbps"] * GB) * 1e3
    step_ms = max(r.first.mean_decode_step_ms for r in report.ranks)
    return {
        "weights_gb": prediction.weights_read_bytes_per_gpu / GB,
        "kv_gb": prediction.kv_bytes_per_gpu / GB,
        "copy_gbps": calibration["copy_bandwidth_gbps"],
        "roofline_ms": roofline_ms,
        "step_ms": step_ms,
        "roofline_fraction": roofline_ms / step_ms if step_ms else 0.0,
        "predicted_step_ms": prediction.step_ms,
        "calibration": calibration.name,
    }


if __name__ == "__main__":
    main()
