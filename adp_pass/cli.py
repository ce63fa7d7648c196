"""``adp`` command line: ``verify`` (parity on real ranks) and ``rewrite`` (one rank's graph)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from adp_pass.mapping import Mapping, MappingError
from adp_pass.presets import PRESETS, qwen3_config


def _splits(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits wants comma-separated integers, got {text!r}")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="rewrite a preset with random weights, run it on real CPU/GPU ranks, check parity",
    )
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--splits", type=_splits, default=None, help="rows per rank, e.g. 1,3")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs logits difference")
    p.add_argument("--seed", type=int, default=0)


def _add_rewrite(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rewrite", help="capture, detect and rewrite one rank's graph")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--mapping", default=None, help='e.g. "tp=8,attn_dp=1", or a .json/.toml file')
    p.add_argument("--rank", type=int, default=0)
    p.add_argument(
        "--meta", action="store_true", help="trace on meta weights (no memory for big presets)"
    )
    p.add_argument("--out", type=Path, default=None, help="write plan, report, graphs, picture")
    p.add_argument("--no-strict", action="store_true", help="list unclassified collectives only")


def cmd_verify(args: argparse.Namespace) -> int:
    from adp_pass.verify import verify

    config = qwen3_config(args.preset)
    print(f"verify: preset {args.preset}, {args.world_size} ranks, batch {args.batch}x{args.seq}")
    report = verify(
        config,
        args.world_size,
        batch=args.batch,
        seq=args.seq,
        splits=args.splits,
        seed=args.seed,
    )
    print(report.plan_text)
    print()
    print(report)
    ok = max(report.tp_max_abs_diff, report.adp_max_abs_diff) <= args.tolerance
    ok = ok and report.collectives_left == 0
    print(f"{'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g}, {report.seconds:.1f} s)")
    return 0 if ok else 1


def cmd_rewrite(args: argparse.Namespace) -> int:
    from adp_pass.capture import capture_hf_qwen3
    from adp_pass.detect import detect
    from adp_pass.rewrite import rewrite

    config = qwen3_config(args.preset)
    mapping = Mapping.load(args.mapping or "tp=2,attn_dp=1")
    mapping.check_model(
        config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    )
    print(f"rewrite: preset {args.preset}, mapping {mapping}, rank {args.rank}", flush=True)
    captured = capture_hf_qwen3(
        config, world_size=mapping.tp_size, rank=args.rank, meta=args.meta
    )
    before = _graph_summary(captured.gm)
    before_code = captured.gm.code
    start = time.perf_counter()
    plan = detect(captured.gm, mapping, strict=not args.no_strict)
    detect_s = time.perf_counter() - start
    gm = rewrite(captured.gm, plan)
    report = gm.meta["adp_report"]
    print(plan)
    print()
    timings = {
        "build_s": captured.timings["build_s"],
        "capture_s": captured.timings["capture_s"],
        "detect_s": detect_s,
        "rewrite_s": report.seconds,
    }
    print("stages: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in timings.items()))
    print(
        f"rewrite: {report.sites_removed} sites removed, {report.shape_constants_fixed} shape "
        f"constants fixed, {report.params_replaced} parameters made full, "
        f"{report.collectives_left} collectives left"
    )
    if args.out is not None:
        from adp_pass.report import write_rewrite_outputs

        paths = write_rewrite_outputs(
            args.out, plan, before, _graph_summary(gm), before_code, gm.code, timings
        )
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _graph_summary(gm) -> dict:
    from adp_pass.report import summarize_graph

    return summarize_graph(gm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_verify(sub)
    _add_rewrite(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            return cmd_verify(args)
        return cmd_rewrite(args)
    except MappingError as err:
        print(f"adp: bad mapping: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
