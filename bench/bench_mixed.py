"""A mixed workload on one GPU: prompts of 64-4096 tokens arriving over time, served packed
(chunked prefill, decode rows in the same calls) and padded (the lockstep-style prefill).

One rank built in-process (Qwen3-8B preset, random weights, bf16, CUDA graphs for decode);
requests arrive as a Poisson process and are added to the engine between steps. Per mode:
time to first token (mean, p50, p90), time per output token after the first (mean, p50),
output tokens/s, prefill calls and the calls that mixed decode rows in.

    python3 bench/bench_mixed.py --requests 64 --rate 16 --out bench/results/mixed-qwen3-8b-h200.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from adp_pass.runtime.serving_config import ServingConfig
from adp_pass.serving.bench import percentile
from results_file import versions


def serve(engine, requests, arrivals: list[float]) -> dict:
    """Add each request at its arrival time, step until all are done; per-request times."""
    start = time.perf_counter()
    pending = sorted(zip(arrivals, requests), key=lambda item: item[0])
    added, first, done = {}, {}, {}
    while pending or engine.has_work:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            arrival, request = pending.pop(0)
            engine.add(request)
            added[request.request_id] = arrival
        if not engine.has_work:
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        finished = engine.step()
        now = time.perf_counter() - start
        for result in finished:  # a request can finish in the step of its first token
            done[result.request_id] = (now, len(result.tokens))
            first.setdefault(result.request_id, now)
        for request_id, tokens in engine.partial_tokens().items():
            if tokens and request_id not in first:
                first[request_id] = now
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    ttft = [first[i] - added[i] for i in added]
    tpot = [(done[i][0] - first[i]) / (done[i][1] - 1) for i in added if done[i][1] > 1]
    tokens = sum(n for _, n in done.values())
    return {
        "wall_s": round(wall, 3),
        "ttft_ms": {"mean": round(1e3 * statistics.mean(ttft), 1),
                    "p50": round(1e3 * percentile(ttft, 50), 1),
                    "p90": round(1e3 * percentile(ttft, 90), 1)},
        "tpot_ms": {"mean": round(1e3 * statistics.mean(tpot), 2),
                    "p50": round(1e3 * percentile(tpot, 50), 2)},
        "output_tok_s": round(tokens / wall, 1),
        "prefill_calls": engine.stats.prefill_calls,
        "mixed_calls": engine.stats.mixed_calls,
        "decode_steps": engine.stats.decode_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-8b")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rate", type=float, default=16.0, help="requests per second")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", default="packed,padded")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from adp_pass.presets import model_config
    from adp_pass.runtime.engine import RankEngine, Request
    from adp_pass.runtime.prepare import prepare_rank
    from adp_pass.runtime.sampling import SamplingParams

    # CPU (Triton's interpreter) only as a smoke test of the script: --preset tiny.
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    config = model_config(args.preset)
    rng = random.Random(0)
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.requests)]
    gaps = [rng.expovariate(args.rate) for _ in range(args.requests)]
    arrivals = [sum(gaps[:i]) for i in range(args.requests)]
    longest = args.max_prompt + args.new_tokens
    block = ServingConfig.block_size
    serving = ServingConfig(
        num_blocks=sum(-(-(n + args.new_tokens) // block) for n in lengths) + 16,
        max_position=longest + 16, max_seq_len=longest, max_batch=args.max_batch,
        cuda_graph_sizes=tuple(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                               if s <= args.max_batch))
    start = time.perf_counter()
    built = prepare_rank(config, "tp=1,attn_dp=1", 0, device=device,
                         dtype=getattr(torch, args.dtype), serving=serving)
    print(f"built in {time.perf_counter() - start:.1f} s: {built.describe()}", flush=True)
    rows = {}
    for mode in args.modes.split(","):
        engine = RankEngine(built.model, built.cache, max_batch=serving.max_batch,
                            max_prefill_tokens=args.max_prefill_tokens,
                            max_seq_len=serving.max_seq_len, max_position=serving.max_position,
                            cuda_graph_sizes=serving.cuda_graph_sizes,
                            packed_prefill=(mode == "packed"))
        generator = torch.Generator().manual_seed(1)
        requests = [Request(f"{mode}-{i}", torch.randint(0, config.vocab_size, (n,),
                                                         generator=generator).tolist(),
                            SamplingParams(max_new_tokens=args.new_tokens))
                    for i, n in enumerate(lengths)]
        # One short request first: kernels compile outside the measurement.
        engine.generate([Request(f"warm-{mode}", [1] * 300, SamplingParams(max_new_tokens=4))])
        engine.stats = type(engine.stats)()
        rows[mode] = serve(engine, requests, arrivals)
        print(f"{mode}: {json.dumps(rows[mode])}", flush=True)
        del engine
    result = {
        "what": f"{args.requests} requests, prompts uniform in [{args.min_prompt}, "
                f"{args.max_prompt}], {args.new_tokens} new tokens, Poisson arrivals at "
                f"{args.rate} req/s, one GPU, CUDA graphs for decode",
        "preset": args.preset, "versions": versions(),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "command": " ".join(sys.argv), "prompt_tokens": sum(lengths), "modes": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
