"""``adp plan``: its flags and its output (table, JSON, sweep picture), beside the cost model.

Torch-free, like the model: the command answers at once on any machine.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from adp_pass.commands.flags import float_in, positive
from adp_pass.errors import UsageError
from adp_pass.presets import PRESETS

_LEGACY_DTYPES = {"bfloat16": None, "float16": None, "float32": 4}


def add_parser(sub, common, fmt) -> None:
    p = sub.add_parser("plan", parents=[common], formatter_class=fmt,
                       help="predict each mapping's decode step for N GPUs (cost model); pick one",
                       description="Predict one decode step per rank for every valid mapping of "
                       "--gpus GPUs with a roofline cost model (weights and KV reads, GEMM rate, "
                       "collectives, overhead; constants from --calibration) and pick the "
                       "mapping with the most tokens/s per GPU that fits in memory. No model is "
                       "built: answers at once on any machine. See docs/cost_model.md.")
    p.add_argument("--preset", metavar="NAME", default=None, choices=sorted(PRESETS),
                   help="model shape: %(choices)s; if not given, qwen3-8b (or the --checkpoint's)")
    p.add_argument("--checkpoint", metavar="DIR", type=Path, default=None,
                   help="Hugging Face Qwen3 checkpoint directory (only config.json is read)")
    p.add_argument("--gpus", metavar="N", type=positive, default=8,
                   help="GPUs of the job (the TP degree of every mapping)")
    p.add_argument("--batch-per-gpu", metavar="N", type=positive, default=64,
                   help="requests per GPU (a TP group of N GPUs serves N times as many)")
    # --prompt-len as in `adp run` (where --prompt is a text); --prompt kept for older scripts.
    p.add_argument("--prompt-len", "--prompt", dest="prompt", metavar="N", type=positive,
                   default=512, help="prompt tokens per request (a count, not a text)")
    p.add_argument("--new-tokens", metavar="N", type=positive, default=128,
                   help="tokens generated per request")
    add_plan_arguments(p)



def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The plan sub-command's flags past --preset/--checkpoint/--gpus/--batch-per-gpu/..."""
    p.add_argument("--gpu", metavar="PROFILE", default=None,
                   help="hardware profile: h20, h100, h200, b200 (adp_pass/data/*.json) or an "
                   "'adp calibrate' output (laid over its GPU's profile); if not given, this "
                   "machine's GPU (nvidia-smi; ADP_GPU overrides), else h200")
    p.add_argument("--calibration", metavar="FILE", type=Path, default=None,
                   help="the same as --gpu FILE (kept for older scripts)")
    p.add_argument("--weights", default="bf16", choices=["bf16", "fp8"],
                   help="linear weights: bf16, or fp8 block-scaled (128 x 128 tiles, one fp32 "
                   "scale each); embedding, LM head and norms stay bf16")
    p.add_argument("--kv-cache", default="bf16", choices=["bf16", "fp8"],
                   help="KV-cache element type")
    p.add_argument("--gpu-memory-gib", metavar="GIB", type=float_in(0, low_open=True),
                   default=None, help="memory per GPU; if not given, the profile's")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="float32 counts everything at 4 bytes (older form; prefer --weights "
                   "and --kv-cache)")
    p.add_argument("--json", action="store_true",
                   help="print every term of every prediction, the profile's provenance and "
                   "the uncertainty as JSON instead of a table")
    p.add_argument("--sweep", action="store_true",
                   help="map the best mapping over requests per GPU (8-512) x context "
                   "(512-32k) and draw it with --out FILE.png")
    p.add_argument("--out", metavar="FILE", type=Path, default=None,
                   help="with --sweep: the picture to write (.png)")
    p.add_argument("--provenance", action="store_true",
                   help="also print where each constant of the profile comes from")


def resolve_model(args: argparse.Namespace) -> tuple[Any, str, int | None]:
    from adp_pass.checks import read_checkpoint_config

    if args.checkpoint is not None and args.preset is not None:
        raise UsageError("give --preset or --checkpoint, not both", flag="--checkpoint",
                         hint="a checkpoint brings its own shape (config.json)")
    if args.checkpoint is not None:
        config = read_checkpoint_config(args.checkpoint)
        return config, str(args.checkpoint), config.get("max_position_embeddings")
    model = args.preset or "qwen3-8b"
    config = PRESETS[model]
    return config, model, config.max_position_embeddings


def load_profile(args: argparse.Namespace):
    from adp_pass.cost_model import load_calibration

    if args.gpu is not None and args.calibration is not None:
        raise UsageError("give --gpu or --calibration, not both", flag="--calibration",
                         hint="--gpu FILE takes an 'adp calibrate' output too")
    return load_calibration(args.gpu if args.gpu is not None else args.calibration)


def run(args: argparse.Namespace, stage=None) -> int:
    from adp_pass.cost_model import (
        GIB, TERMS, NothingFits, check_fp8, format_table, pick, rank_mappings)
    from adp_pass.profiles import provenance_lines

    config, model, max_position = resolve_model(args)
    if args.out is not None and not args.sweep:
        raise UsageError("--out writes the --sweep picture; add --sweep", flag="--out")
    if args.sweep:
        return run_sweep(args, config, model, max_position)
    if max_position and args.prompt + args.new_tokens > max_position:
        raise UsageError(f"--prompt {args.prompt} + --new-tokens {args.new_tokens} is longer than "
                         f"{model}'s {max_position} positions", flag="--prompt",
                         hint=f"keep prompt + new tokens within {max_position}")
    calibration = load_profile(args)
    if args.weights == "fp8":
        check_fp8(config, args.gpus, model)
    memory = None if args.gpu_memory_gib is None else int(args.gpu_memory_gib * GIB)
    dtype_bytes = _LEGACY_DTYPES[args.dtype]
    if dtype_bytes == 4 and (args.weights != "bf16" or args.kv_cache != "bf16"):
        raise UsageError("--dtype float32 counts everything at 4 bytes; it does not combine with "
                         "--weights / --kv-cache", flag="--dtype", hint="drop --dtype")
    kw = dict(batch_per_gpu=args.batch_per_gpu, prompt=args.prompt, new_tokens=args.new_tokens,
              calibration=calibration, gpu_memory_bytes=memory, dtype_bytes=dtype_bytes,
              weights=args.weights, kv_cache=args.kv_cache)
    ranked = rank_mappings(config, args.gpus, **kw)
    try:
        chosen, failure = pick(config, args.gpus, ranked=ranked, **kw), None
    except NothingFits as err:
        chosen, failure = None, err
    dtypes = ("fp32" if dtype_bytes == 4 else
              f"weights {args.weights}, KV cache {args.kv_cache}, activations bf16")
    if args.json:
        print(json.dumps({
            "model": model, "gpus": args.gpus, "batch_per_gpu": args.batch_per_gpu,
            "prompt": args.prompt, "new_tokens": args.new_tokens, "dtype": args.dtype,
            "weights": args.weights, "kv_cache": args.kv_cache,
            "calibration": calibration.where, "calibration_source": calibration.source,
            "profile": {"gpu": calibration.name, "where": calibration.where,
                        "constants": {k: v for k, v in calibration.data.items()
                                      if k in calibration.provenance},
                        "provenance": calibration.provenance},
            "terms": {key: meaning for key, _, meaning in TERMS},
            "uncertainty": "step_ms_range / tok_s_per_gpu_range: every collective latency at "
                           "the low / high end of its range (collectives[].latency_range) and "
                           "the host's work per request at the low / high end of its "
                           "(host_per_request_us_range)",
            "host_per_request_us_range": list(calibration.value_range("host_per_request_us")),
            "predictions": [p.as_dict() for _, p in ranked],
            "pick": None if chosen is None else chosen.prediction.name,
            "pick_stable": None if chosen is None else _stable(chosen, ranked),
            "reason": str(failure) if chosen is None else chosen.reason,
        }, indent=1, default=_jsonable))
    else:
        gib = (args.gpu_memory_gib if args.gpu_memory_gib is not None
               else calibration["device_memory_gib"])
        print(f"plan: {model} on {args.gpus} GPU{'s' * (args.gpus != 1)}, "
              f"{args.batch_per_gpu} requests per GPU, prompt {args.prompt} + "
              f"{args.new_tokens} new tokens, {dtypes}")
        print(textwrap.fill(f"profile: {calibration.name}, {calibration.where} "
                            f"({calibration.source}); {gib:g} GiB per GPU, "
                            f"{calibration['memory_reserve_gib']:g} GiB reserved", width=100,
                            subsequent_indent="  "))
        if args.provenance:
            for line in provenance_lines(calibration.provenance):
                print(textwrap.fill(line, width=100, initial_indent="  ",
                                    subsequent_indent="      "))
        print()
        table = format_table(ranked, None if chosen is None else chosen.prediction)
        head, _, legend = table.partition("\n\n")
        print(head)
        print()
        print(textwrap.fill(" ".join(legend.split("\n")), width=100))
        notes = sorted({n for _, p in ranked for n in p.notes})
        for note in notes:
            print(f"note: {note}")
        print()
        if chosen is not None:
            print(f"pick: {chosen}")
            if not _stable(chosen, ranked):
                print("  (the pick changes with the collective latencies inside their range: "
                      "see the range column)")
    if failure is not None:
        raise failure
    return 0


def _stable(chosen, ranked) -> bool:
    """Whether the pick stays first with every latency at its low and at its high end."""
    fitting = [p for _, p in ranked if p.fits and not (p.reference and len(ranked) > 1)]
    for end in (0, 1):
        best = min(fitting, key=lambda p: p.step_ms_range[end])  # the same b: least step wins
        if best is not chosen.prediction:
            return False
    return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def run_sweep(args: argparse.Namespace, config: Any, model: str, max_position: int | None) -> int:
    from adp_pass.plan_sweep import draw_sweep, sweep

    if args.out is None:
        raise UsageError("--sweep draws a picture: give --out FILE.png", flag="--sweep",
                         hint="e.g. --out sweep.png")
    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out {args.out} must end in .png", flag="--out")
    if args.out.exists() and args.out.is_dir():
        raise UsageError(f"--out {args.out} is a directory; give a file name", flag="--out")
    if not args.out.parent.exists():
        raise UsageError(f"--out: the directory {args.out.parent} does not exist", flag="--out")
    calibration = load_profile(args)
    if args.weights == "fp8":
        from adp_pass.cost_model import check_fp8

        check_fp8(config, args.gpus, model)
    result = sweep(config, args.gpus, calibration=calibration, weights=args.weights,
                   kv_cache=args.kv_cache, new_tokens=args.new_tokens,
                   max_position=max_position)
    draw_sweep(result, args.out, title=f"{model}, {args.gpus} x {calibration.name}, weights "
               f"{args.weights}, KV {args.kv_cache}")
    if args.json:
        print(json.dumps(result.as_dict(), indent=1, default=_jsonable))
    else:
        print(result.summary())
        print(f"wrote {args.out}")
    return 0
