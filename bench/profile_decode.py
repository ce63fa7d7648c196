"""Where a decode step's time goes, on one GPU: engine step vs graph replay vs roofline, and
each kernel's share of an eager (profiled) decode step.

Builds one rank of ``tp=1,attn_dp=1`` in this process (random weights), prefills
``--batch`` prompts of ``--prompt-len`` tokens, then measures:

- ``engine_step_ms``: ``RankEngine.step()`` in steady decode (CUDA graph replay + host work:
  input tensors, sampling, bookkeeping);
- ``replay_ms``: the captured decode graph alone;
- ``roofline_ms``: weight bytes (without the embedding table) + KV bytes read per step over the
  measured copy bandwidth;
- ``kernels``: CUDA time per step of each kernel (torch.profiler, eager model, no graphs);
- ``variants`` (``--variants``): the decode graph's replay under other launch settings (L2
  weight prefetch mode and byte caps, the KV loads' eviction policy), each captured in its own
  CUDA graph and timed in interleaved rounds, so the settings compare on one build.

    python bench/profile_decode.py --preset qwen3-8b --batch 64 --prompt-len 512 --out F.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from gpu_timing import graph_ms
from results_file import versions, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-8b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--trace", type=Path, default=None, help="chrome trace of the profile")
    parser.add_argument("--no-decode-mm", action="store_true",
                        help="every projection on cuBLAS (prepare_rank(decode_gemms=False))")
    parser.add_argument("--variants", default="",
                        help="';'-separated NAME:key=value,... with keys mode (off|bulk|lines|"
                             "auto), attention and gap (MiB prefetched per site), evict "
                             "(evict_first|none), side (1: prefetch on a side stream, 0: inline), pdl (off|wait|"
                             "trigger: programmatic dependent launch of our kernels); a key left out keeps the "
                             "runtime's default. Replay of each, e.g. "
                             "'off:mode=off;bulk:mode=bulk,attention=32,gap=8'")
    parser.add_argument("--variant-rounds", type=int, default=5)
    parser.add_argument("--prefetch-weights", action="store_true",
                        help="build with the L2 weight prefetches (prepare_rank("
                             "prefetch_weights=True)); --variants then sets their mode")
    args = parser.parse_args()

    from adp_pass.calibrate import GPU_SIZES, measure_copy
    from adp_pass.cost_model import GB, ModelShape
    from adp_pass.presets import model_config
    from adp_pass.runtime.engine import RankEngine, Request, decode_batch
    from adp_pass.runtime.prepare import prepare_rank
    from adp_pass.runtime.sampling import SamplingParams
    from adp_pass.runtime.serving_config import ServingConfig

    device = torch.device("cuda", 0)
    dtype = getattr(torch, args.dtype)
    config = model_config(args.preset)
    new_tokens = 2 * args.steps + args.profile_steps + 24
    seq_len = args.prompt_len + new_tokens
    serving = ServingConfig(
        num_blocks=-(-seq_len // ServingConfig.block_size) * args.batch + 8,
        max_position=seq_len + 16, max_seq_len=seq_len, max_batch=args.batch,
        cuda_graph_sizes=(args.batch,))
    start = time.perf_counter()
    built = prepare_rank(config, "tp=1,attn_dp=1", 0, device=device, dtype=dtype,
                         serving=serving, decode_gemms=not args.no_decode_mm,
                         prefetch_weights=args.prefetch_weights)
    print(f"built in {time.perf_counter() - start:.1f} s: {built.describe()}", flush=True)
    engine = RankEngine(built.model, built.cache, max_batch=serving.max_batch,
                        max_seq_len=serving.max_seq_len, max_position=serving.max_position,
                        cuda_graph_sizes=serving.cuda_graph_sizes)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len),
                            generator=generator)
    for i in range(args.batch):
        engine.add(Request(i, prompts[i].tolist(), SamplingParams(max_new_tokens=new_tokens)))
    while engine.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()

    # Engine steps (graph replay + host work), wall clock: decoding one step ahead of the host
    # (the default), then in step with it. Ahead, the clock runs between step() returns once the
    # pipeline is full (step() returns paced by the GPU), so a start from an idle GPU does not
    # count; in step, each step() waits for its own replay anyway.
    step_ms = {}
    for ahead in (True, False):
        engine.async_decode = ahead
        for _ in range(4 if ahead else 1):  # the switch, then fill the pipeline
            engine.step()
        torch.cuda.synchronize()
        if ahead:
            for _ in range(2):
                engine.step()
        mark = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        if not ahead:
            torch.cuda.synchronize()
        step_ms[ahead] = (time.perf_counter() - mark) / args.steps * 1e3
    torch.cuda.synchronize()
    engine_step_ms, engine_step_in_step_ms = step_ms[True], step_ms[False]

    # The graph alone.
    replay_ms = graph_ms(engine.runner.graphs.graphs[args.batch], args.steps)

    # Roofline: every weight once, plus each sequence's K and V so far, per step. The embedding
    # table is not read (a step gathers batch rows of it) unless the LM head shares it.
    element = torch.finfo(dtype).bits // 8
    unread = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size * element
    weight_bytes = sum(p.numel() * p.element_size() for p in built.model.parameters()) - unread
    # The KV each sequence holds now, when the graph alone is replayed (the engine steps ran
    # from ~prompt_len + 8 to here).
    context = sum(engine.cache.context_len(s.request.request_id)
                  for s in engine.running.values()) / len(engine.running)
    kv_bytes = ModelShape.of(config).kv_bytes_per_token(
        config.num_key_value_heads, element) * context * args.batch
    bandwidth = measure_copy(device, GPU_SIZES) * GB  # bytes/s, read + written
    roofline_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3

    # Eager decode calls under the profiler: per-kernel CUDA time.
    seqs = list(engine.running.values())
    ids = [s.request.request_id for s in seqs]
    inputs = decode_batch([s.generated[-1] for s in seqs],
                          [engine.cache.context_len(i) for i in ids],
                          [-1] * len(ids),  # write nothing: the same call can repeat
                          [engine.cache.block_table(i) for i in ids],
                          [engine.cache.context_len(i) for i in ids], len(ids), device)
    with torch.no_grad():
        for _ in range(2):
            built.model(*inputs)
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile_steps):
                built.model(*inputs)
            torch.cuda.synchronize()
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    per_kernel: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time_total / 1e3 / args.profile_steps
            calls[event.name] += 1
    kernels = sorted(({"kernel": k[:120], "ms_per_step": round(v, 4),
                       "calls_per_step": calls[k] // args.profile_steps}
                      for k, v in per_kernel.items()), key=lambda r: -r["ms_per_step"])
    cpu_ops = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    eager_ms = sum(r["ms_per_step"] for r in kernels)

    print(f"engine step {engine_step_ms:.2f} ms (in step with the host: "
          f"{engine_step_in_step_ms:.2f} ms), graph replay {replay_ms:.2f} ms, roofline "
          f"{roofline_ms:.2f} ms (weights {weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.2f} "
          f"GB at {bandwidth / 1e12:.2f} TB/s): replay at {roofline_ms / replay_ms:.0%} of it")
    print(f"eager kernels {eager_ms:.2f} ms per step:")
    for row in kernels[:25]:
        print(f"  {row['ms_per_step']:8.3f} ms  x{row['calls_per_step']:<4} {row['kernel']}")
    print(cpu_ops)
    result = {
        "preset": args.preset, "batch": args.batch, "prompt_len": args.prompt_len,
        "dtype": args.dtype, "gpu": torch.cuda.get_device_name(0),
        "versions": versions(),
        "command": " ".join(sys.argv),
        "engine_step_ms": round(engine_step_ms, 3),
        "engine_step_in_step_ms": round(engine_step_in_step_ms, 3), "replay_ms": round(replay_ms, 3),
        "roofline_ms": round(roofline_ms, 3), "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
        "weight_gb": round(weight_bytes / 1e9, 3), "kv_gb": round(kv_bytes / 1e9, 3),
        "eager_kernel_ms": round(eager_ms, 3), "kernels": kernels,
        "build": built.describe(),
        "decode_mm_nodes": built.counts.get("decode_mm", 0),
    }
    result["greedy_argmax_us"] = time_argmax(args.batch, config.vocab_size, dtype, device)
    print(f"argmax of [{args.batch}, {config.vocab_size}] logits in a CUDA graph: "
          f"{result['greedy_argmax_us']}", flush=True)
    if args.variants:
        result["variants"] = replay_variants(built.model, inputs, args.variants,
                                             args.variant_rounds, args.steps)
        for name, row in result["variants"].items():
            print(f"variant {name}: replay {row.get('replay_ms', float('nan')):.3f} ms "
                  f"(rounds {row.get('rounds_ms')}) {row.get('error', '')}", flush=True)
    write_result(args.out, result)


def time_argmax(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Microseconds of torch.argmax and adp.greedy_argmax over [rows, vocab] logits, each
    replayed from a CUDA graph of 20 calls."""
    from adp_pass.runtime.kernels import argmax  # noqa: F401  (registers the op)

    logits = torch.randn(rows, vocab, device=device).to(dtype)
    assert torch.equal(torch.ops.adp.greedy_argmax(logits), logits.argmax(dim=-1))
    timings = {}
    for name, fn in (("torch", lambda: logits.argmax(dim=-1)),
                     ("adp", lambda: torch.ops.adp.greedy_argmax(logits))):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                fn()
        graph.replay()
        timings[name] = round(graph_ms(graph, 10) / 20 * 1e3, 2)
    return timings


def _parse_variants(spec: str) -> dict[str, dict[str, str]]:
    variants = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, _, settings = item.partition(":")
        variants[name] = dict(kv.split("=", 1) for kv in filter(None, settings.split(",")))
    return variants


@contextlib.contextmanager
def _launch_settings(settings: dict[str, str]):
    """The runtime's launch settings as ``settings`` says (a key left out keeps its value),
    restored on exit."""
    from adp_pass.runtime.kernels import paged_attention, prefetch
    from adp_pass.runtime.kernels import utils as kernel_utils

    mib = lambda v: int(float(v) * (1 << 20))  # noqa: E731
    knobs = {  # key: (object or dict, attribute or key, parse)
        "mode": (prefetch, "MODE", str),
        "side": (prefetch, "SIDE_STREAM", lambda v: v == "1"),
        "pdl": (kernel_utils, "PDL", str),
        "evict": (paged_attention, "KV_EVICTION", lambda v: "" if v == "none" else v),
        "attention": (prefetch.BYTES, "attention", mib),
        "gap": (prefetch.BYTES, "gap", mib),
    }
    unknown = set(settings) - set(knobs)
    if unknown:
        raise ValueError(f"unknown variant settings {sorted(unknown)}; known: {sorted(knobs)}")

    def get(key):
        where, name, _ = knobs[key]
        return where[name] if isinstance(where, dict) else getattr(where, name)

    def put(key, value):
        where, name, _ = knobs[key]
        if isinstance(where, dict):
            where[name] = value
        else:
            setattr(where, name, value)

    saved = {key: get(key) for key in knobs}
    try:
        for key, value in settings.items():
            put(key, knobs[key][2](value))
        yield
    finally:
        for key, value in saved.items():
            put(key, value)


def replay_variants(model, inputs, spec: str, rounds: int, steps: int) -> dict[str, dict]:
    """Replay time of the decode graph captured under each variant's settings (settings a
    variant leaves out keep the runtime's defaults)."""
    graphs, results = {}, {}
    for name, settings in _parse_variants(spec).items():
        with _launch_settings(settings):
            try:
                with torch.no_grad():
                    for _ in range(2):  # compiles this variant's kernels
                        model(*inputs)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        model(*inputs)
                graphs[name] = graph
                results[name] = {"settings": settings, "rounds_ms": []}
            except Exception as err:  # noqa: BLE001 - a variant that fails is reported, not fatal
                results[name] = {"settings": settings, "error": f"{type(err).__name__}: {err}"[:500]}
                torch.cuda.synchronize()
    for _ in range(rounds):
        for name, graph in graphs.items():
            graph.replay()  # warm
            results[name]["rounds_ms"].append(round(graph_ms(graph, steps), 4))
    for row in results.values():
        if row.get("rounds_ms"):
            ordered = sorted(row["rounds_ms"])
            row["replay_ms"] = ordered[len(ordered) // 2]
    return results


if __name__ == "__main__":
    main()
