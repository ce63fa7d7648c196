"""``adp rewrite``: capture, detect and rewrite one rank's graph; print a summary, and with --out
write the plan, both graphs, a picture and the rank's serving artifact.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from adp_pass.checks import check_out_dir
from adp_pass.commands.flags import (ModelShape, add_model_flags, check_fp8_shards,
                                     check_model_fits_mapping, int_at_least, model_shape,
                                     parse_mapping)
from adp_pass.errors import UsageError
from adp_pass.mapping import Mapping

DEFAULT_MAPPING = "tp=2,attn_dp=1"
DEFAULT_PRESET = "small"


def add_parser(sub, common, fmt) -> None:
    p = sub.add_parser("rewrite", parents=[common], formatter_class=fmt,
                       help="capture, detect and rewrite one rank's graph; print a summary",
                       description="Trace one rank of a TP job on a fake process group, find the "
                       "collectives and rewrite the graph to attention-DP. Prints a summary; "
                       "-v prints the full plan, --out writes it with both graphs and a picture. "
                       "With a --checkpoint, its config.json is traced (an FP8 one with FP8 "
                       "linears, their scales sharded with their weights, as adp run serves it).")
    add_model_flags(p, DEFAULT_PRESET, checkpoint_help=": its config is traced (FP8 linears for "
                    "an FP8 one), its weights drive the numeric self-check (replicated mappings), "
                    "and --out's serving artifact is the one adp run --checkpoint DIR loads")
    p.add_argument("--mapping", metavar="SPEC", default=DEFAULT_MAPPING,
                   help='"tp=8,attn_dp=1" form (keys world, tp, attn_dp, attn_tp, mlp_tp), or a '
                   ".json/.toml file with the same keys")
    p.add_argument("--rank", metavar="N", type=int_at_least(0), default=0, help="which TP rank to trace")
    p.add_argument("--meta", action="store_true",
                   help="trace on meta weights (no memory needed for big presets)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help="directory for plan.json, report.txt, summary.json, both graphs, "
                   "before_after.png and the rank's serving artifact (cache/: adp run --cache-dir "
                   "DIR/cache loads it; docs/build_cache.md)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the serving artifact --out writes")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="device type of the serving artifact --out writes (it is built there)")
    p.add_argument("--no-strict", action="store_true",
                   help="list collectives no pattern explains instead of failing")
    p.add_argument("--no-self-check", action="store_true",
                   help="skip the check of the rewritten graph's shapes (not advised)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the full plan listing")
    p.add_argument("--dump-dir", metavar="DIR", type=Path, default=None,
                   help="write each stage's graph as text to DIR (01-capture.txt, 02-detect.txt: "
                   "the plan, 03-rewrite.txt; with --out also lower and cache); if not given, none")


def run(args: argparse.Namespace, stage) -> int:
    model = model_shape(args, DEFAULT_PRESET)
    mapping = parse_mapping(args.mapping)
    check_model_fits_mapping(model, mapping, "--mapping")
    if args.rank >= mapping.tp_size:
        raise UsageError(f"--rank {args.rank} is not a rank of the mapping's tp={mapping.tp_size} "
                         f"(ranks 0..{mapping.tp_size - 1})", flag="--rank")
    if args.out is not None:
        check_out_dir(args.out)
    if args.dump_dir is not None:
        check_out_dir(args.dump_dir, "--dump-dir")

    with stage("import torch and transformers"):
        from adp_pass.capture import capture_hf_qwen3
        from adp_pass.pipeline import Pipeline
        from adp_pass.report import (summarize_graph, traced_dtypes, weight_bytes,
                                     write_rewrite_outputs)
    _check_artifact_device(args)
    check_fp8_shards(model.checkpoint, mapping)
    config = model.config()
    fp8_weights = _fp8_weights(model)

    print(f"rewrite: {model.label}, mapping {mapping}, rank {args.rank}", flush=True)
    pipeline = Pipeline(args.dump_dir)
    with stage(f"build and capture rank {args.rank}'s TP graph"):
        captured = pipeline.capture(lambda: capture_hf_qwen3(
            config, world_size=mapping.tp_size, rank=args.rank, meta=args.meta))
    if fp8_weights:  # before detect, as prepare_rank: the scales are sharded with their weights
        with stage(f"FP8 linears ({len(fp8_weights)} fp8 weights of the checkpoint)"):
            pipeline.fp8_linears(captured.gm, fp8_weights)
    before, before_code = summarize_graph(captured.gm), captured.gm.code
    with stage("detect"):
        plan = pipeline.detect(captured.gm, mapping, strict=not args.no_strict)
    state = _self_check_tensors(args, model, plan, stage)
    with stage("rewrite"):
        gm = pipeline.rewrite(captured.gm, plan, state_dict=state,
                              self_check=not args.no_self_check)
    report = pipeline.rewrite_report
    timings = {"build_s": captured.timings["build_s"], "capture_s": captured.timings["capture_s"]}
    if fp8_weights:
        timings["fp8_linears_s"] = pipeline.seconds("fp8_linears")
    timings.update(detect_s=pipeline.seconds("detect"), rewrite_s=report.seconds)
    if args.verbose:
        print(plan)
        print()
    tp_bytes, adp_bytes = weight_bytes(plan)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(plan.counts().items()))
    actions = ", ".join(f"{n} {a}" for a, n in sorted(
        Counter(s.action + (f" over {s.group_tag} ({s.group_size})" if s.action != "remove"
                            else "d") for s in plan.sites).items()))
    print(f"  {len(plan.sites)} sites ({counts}): {actions}; {report.collectives_left} "
          f"collectives left, {len(plan.unclassified)} unclassified")
    serving = ("FP8 weights 1 byte each, with their scales" if fp8_weights
               else "bf16 serving holds half")
    print(f"  {report.shape_constants_fixed} shape constants fixed, {report.params_replaced} "
          f"parameters regrouped: weights per rank {_mb(tp_bytes)} -> {_mb(adp_bytes)} "
          f"({traced_dtypes(plan)} as traced; {serving})")
    if fp8_weights:
        scales = [p for p in plan.params if p.name.endswith("weight_scale_inv")]
        print(f"  {len(fp8_weights)} FP8 linears: {len(scales)} weight_scale_inv tensors, "
              f"{sum(p.layout != 'replicated' for p in scales)} sharded with their weights")
    if state is not None:  # the checkpoint's weights: the first layer checked on numbers
        print(f"  self-check: {report.self_check}")
    print("  stages: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in timings.items()))
    if args.out is not None:
        with stage(f"write {args.out}"):
            paths = write_rewrite_outputs(args.out, plan, before, summarize_graph(gm),
                                          before_code, gm.code, timings)
        print(f"  wrote {len(paths)} files to {args.out}: " + ", ".join(p.name for p in paths))
        _write_serving_artifact(args, mapping, config, fp8_weights, gm, plan, stage, pipeline)
    elif not args.verbose:
        print("  (-v prints the full plan; --out DIR writes it, both graphs and a picture)")
    return 0


def _check_artifact_device(args: argparse.Namespace) -> None:
    """Before the trace: the serving artifact of ``adp rewrite --out`` is built on --device."""
    import torch

    if args.out is not None and not args.meta and args.device == "cuda" and \
            not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here", flag="--device",
                         hint="build the artifact on a machine of the serving device type")


def _fp8_weights(model: ModelShape) -> list[str]:
    """The checkpoint's fp8 weights (validated from its headers): the linears a rank of it runs
    in FP8, as ``prepare_rank`` decides; none for a preset or an unquantized checkpoint."""
    if not model.fp8:
        return []
    from adp_pass.fp8_linears import checkpoint_fp8_weights

    return checkpoint_fp8_weights(model.checkpoint)


def _self_check_tensors(args: argparse.Namespace, model: ModelShape, plan, stage):
    """With a checkpoint, the unsharded weights the rewrite's numeric self-check reads (it runs
    the first layer on numbers and checks every weight's full shape): only where that check
    runs (a replicated mapping, whose rank holds every weight whole anyway; a trace on real
    tensors; the check not turned off)."""
    if model.checkpoint is None or args.meta or args.no_self_check or not plan.replicated_only:
        return None
    from adp_pass.verify import checkpoint_tensors

    with stage(f"read {model.name} for the numeric self-check"):
        return checkpoint_tensors(model.checkpoint)


def _write_serving_artifact(args: argparse.Namespace, mapping: Mapping, config,
                            fp8_weights: list[str], gm, plan, stage, pipeline) -> None:
    """``adp rewrite --out``: the rank's built graph (lowered, KV cache inserted, no weights) as a
    build-cache entry under ``OUT/cache``, what ``prepare_rank`` would build for this model
    (preset, or checkpoint: its config and, for an FP8 one, its FP8 linears), mapping, rank,
    dtype and device type, so ``adp run --cache-dir OUT/cache`` (with the same --checkpoint)
    loads it. The rewrite's own graph is used when it is that graph (float32 on cpu, traced for
    real, every collective explained), its ``pipeline`` going on with the lowering; else the
    rank is built by a pipeline of its own (dumps under ``--dump-dir``/artifact)."""
    if args.meta:
        print("  no serving artifact: a --meta trace cannot take the KV cache (run without --meta)")
        return
    import torch

    from adp_pass.pipeline import Pipeline
    from adp_pass.runtime.prepare import build_artifact

    reuse = (args.dtype == "float32" and args.device == "cpu" and not plan.unclassified)
    if not reuse:
        pipeline = Pipeline(args.dump_dir / "artifact" if args.dump_dir is not None else None)
    cache = args.out / "cache"
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with stage(f"lower, insert the KV cache, store the serving artifact in {cache}"):
        entry = build_artifact(config, mapping, args.rank, cache, device=device, dtype=dtype,
                               rewritten=(gm, plan) if reuse else None, pipeline=pipeline,
                               fp8_weights=fp8_weights)
    print(f"  serving artifact ({args.dtype} on {args.device}): {entry} (adp run --cache-dir "
          f"{cache})")


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
