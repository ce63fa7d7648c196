"""``adp`` command line: ``verify`` (parity on real ranks), ``rewrite`` (one rank's graph),
``run`` (generation on attention-DP ranks started by torchrun)."""

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
    p.add_argument("--lower", action="store_true", help="also lower to the Triton ops and compare")


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


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="serve requests on attention-DP ranks started by torchrun (generation)"
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint dir (safetensors)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--requests", type=int, default=4, help="synthetic requests (random prompts)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--cuda-graphs", default="1,2,4,8,16,32,64", help="decode batch sizes")


def cmd_run(args: argparse.Namespace) -> int:
    from adp_pass.runtime.frontend import assign_by_load, make_job, run_job, synthetic_requests
    from adp_pass.runtime.sampling import SamplingParams

    vocab = qwen3_config(args.preset).vocab_size
    if args.checkpoint:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(args.checkpoint).vocab_size
    params = SamplingParams(args.new_tokens, args.temperature, args.top_p)
    requests = synthetic_requests(args.requests, args.prompt_len, params, vocab)
    job = make_job(
        f"tp={args.world_size},attn_dp=1", assign_by_load(requests, args.world_size),
        preset=args.preset, checkpoint=args.checkpoint, dtype=args.dtype,
        num_blocks=args.num_blocks, max_position=args.prompt_len + args.new_tokens + 16,
        max_seq_len=args.prompt_len + args.new_tokens,
        cuda_graph_sizes=[int(s) for s in args.cuda_graphs.split(",") if s],
    )
    print(f"run: {len(requests)} requests over {args.world_size} ranks (torchrun)", flush=True)
    report = run_job(job, args.world_size)
    for rank in report.ranks:
        for result in rank["results"]:
            print(f"  rank {rank['rank']} {result['request_id']}: {result['tokens']} "
                  f"({result['finish_reason']})")
    print(report)
    return 0


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
        lower_ops=args.lower,
    )
    print(report.plan_text)
    print()
    print(report)
    diffs = [report.tp_max_abs_diff, report.adp_max_abs_diff]
    if report.lowered_vs_rewritten_max_abs_diff is not None:
        diffs.append(report.lowered_vs_rewritten_max_abs_diff)
    ok = max(diffs) <= args.tolerance
    ok = ok and report.collectives_left == 0
    print(f"{'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g}, {report.seconds:.1f} s)")
    return 0 if ok else 1


def cmd_rewrite(args: argparse.Namespace) -> int:
    from adp_pass.capture import capture_hf_qwen3
    from adp_pass.detect import detect
    from adp_pass.report import summarize_graph, write_rewrite_outputs
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
    before = summarize_graph(captured.gm)
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
        paths = write_rewrite_outputs(
            args.out, plan, before, summarize_graph(gm), before_code, gm.code, timings
        )
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_verify(sub)
    _add_rewrite(sub)
    _add_run(sub)
    args = parser.parse_args(argv)
    commands = {"verify": cmd_verify, "rewrite": cmd_rewrite, "run": cmd_run}
    try:
        return commands[args.command](args)
    except MappingError as err:
        print(f"adp: bad mapping: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
