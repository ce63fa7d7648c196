"""``adp rewrite``: capture, detect and rewrite one rank's graph; print a summary, and with --out
write the plan, both graphs, a picture and the rank's serving artifact.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from adp_pass.checks import check_out_dir
from adp_pass.commands.flags import check_tp_fits_model, int_at_least, parse_mapping
from adp_pass.errors import UsageError
from adp_pass.mapping import Mapping
from adp_pass.presets import PRESETS

DEFAULT_MAPPING = "tp=2,attn_dp=1"


def add_parser(sub, common, fmt) -> None:
    p = sub.add_parser("rewrite", parents=[common], formatter_class=fmt,
                       help="capture, detect and rewrite one rank's graph; print a summary",
                       description="Trace one rank of a TP job on a fake process group, find the "
                       "collectives and rewrite the graph to attention-DP. Prints a summary; "
                       "-v prints the full plan, --out writes it with both graphs and a picture.")
    p.add_argument("--preset", metavar="NAME", default="small", choices=sorted(PRESETS), help="model shape: %(choices)s")
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
    shape = PRESETS[args.preset]
    mapping = parse_mapping(args.mapping)
    check_tp_fits_model(mapping, shape.num_attention_heads, shape.num_key_value_heads,
                         shape.intermediate_size, "--mapping")
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
        from adp_pass.presets import qwen3_config
        from adp_pass.report import (summarize_graph, traced_dtypes, weight_bytes,
                                     write_rewrite_outputs)
    _check_artifact_device(args)

    print(f"rewrite: preset {args.preset}, mapping {mapping}, rank {args.rank}", flush=True)
    pipeline = Pipeline(args.dump_dir)
    with stage(f"build and capture rank {args.rank}'s TP graph"):
        captured = pipeline.capture(lambda: capture_hf_qwen3(
            qwen3_config(args.preset), world_size=mapping.tp_size, rank=args.rank,
            meta=args.meta))
    before, before_code = summarize_graph(captured.gm), captured.gm.code
    with stage("detect"):
        plan = pipeline.detect(captured.gm, mapping, strict=not args.no_strict)
    with stage("rewrite"):
        gm = pipeline.rewrite(captured.gm, plan, self_check=not args.no_self_check)
    report = pipeline.rewrite_report
    timings = {"build_s": captured.timings["build_s"], "capture_s": captured.timings["capture_s"],
               "detect_s": pipeline.seconds("detect"), "rewrite_s": report.seconds}
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
    print(f"  {report.shape_constants_fixed} shape constants fixed, {report.params_replaced} "
          f"parameters regrouped: weights per rank {_mb(tp_bytes)} -> {_mb(adp_bytes)} "
          f"({traced_dtypes(plan)} as traced; bf16 serving holds half)")
    print("  stages: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in timings.items()))
    if args.out is not None:
        with stage(f"write {args.out}"):
            paths = write_rewrite_outputs(args.out, plan, before, summarize_graph(gm),
                                          before_code, gm.code, timings)
        print(f"  wrote {len(paths)} files to {args.out}: " + ", ".join(p.name for p in paths))
        _write_serving_artifact(args, mapping, gm, plan, stage, pipeline)
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


def _write_serving_artifact(args: argparse.Namespace, mapping: Mapping, gm, plan,
                            stage, pipeline) -> None:
    """``adp rewrite --out``: the rank's built graph (lowered, KV cache inserted, no weights) as a
    build-cache entry under ``OUT/cache``, what ``prepare_rank`` would build for this preset,
    mapping, rank, dtype and device type. The rewrite's own graph is used when it is that graph
    (float32 on cpu, traced for real, every collective explained), its ``pipeline`` going on
    with the lowering; else the rank is built by a pipeline of its own (dumps under
    ``--dump-dir``/artifact)."""
    if args.meta:
        print("  no serving artifact: a --meta trace cannot take the KV cache (run without --meta)")
        return
    import torch

    from adp_pass.pipeline import Pipeline
    from adp_pass.presets import qwen3_config
    from adp_pass.runtime.prepare import build_artifact

    reuse = (args.dtype == "float32" and args.device == "cpu" and not plan.unclassified)
    if not reuse:
        pipeline = Pipeline(args.dump_dir / "artifact" if args.dump_dir is not None else None)
    cache = args.out / "cache"
    with stage(f"lower, insert the KV cache, store the serving artifact in {cache}"):
        entry = build_artifact(qwen3_config(args.preset), mapping, args.rank, cache,
                               device=torch.device(args.device), dtype=getattr(torch, args.dtype),
                               rewritten=(gm, plan) if reuse else None, pipeline=pipeline)
    print(f"  serving artifact ({args.dtype} on {args.device}): {entry} (adp run --cache-dir "
          f"{cache})")




def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
