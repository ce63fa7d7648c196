"""``adp verify``: rewrite a preset (random weights) or a checkpoint, run the TP and the
attention-DP graphs on real ranks and compare both with transformers (adp_pass/verify.py does
the work).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adp_pass.checks import check_out_dir
from adp_pass.commands.flags import (add_device_flag, add_model_flags, check_fp8_shards,
                                     check_model_fits_mapping, check_ranks_fit_machine, float_in,
                                     int_at_least, int_list, model_shape, parse_mapping, positive,
                                     ranks_device)
from adp_pass.errors import UsageError

DEFAULT_PRESET = "small"


def add_parser(sub, common, fmt) -> None:
    p = sub.add_parser("verify", parents=[common], formatter_class=fmt,
                       help="rewrite a preset (random weights) or a checkpoint, run it on real "
                       "ranks, check parity with transformers",
                       description="Rewrite a preset (random weights) or a --checkpoint for "
                       "--world-size ranks, run the TP and the attention-DP graphs on real ranks "
                       "(gloo on CPU, NCCL on GPU) and compare both with transformers. With an FP8 "
                       "checkpoint the ranks run FP8 linears and the FP8 bounds of docs/fp8.md "
                       "apply (see --tolerance).")
    add_model_flags(p, DEFAULT_PRESET, checkpoint_help=": each rank loads its shard, "
                    "transformers the whole (an FP8 one dequantized); the graphs run in fp32")
    p.add_argument("--world-size", metavar="N", type=positive, default=2,
                   help="ranks to start; also the TP degree the graph is traced with")
    add_device_flag(p)
    p.add_argument("--batch", metavar="N", type=positive, default=4, help="sequences in the test batch")
    p.add_argument("--seq", metavar="N", type=positive, default=16, help="tokens per sequence")
    p.add_argument("--mapping", metavar="SPEC", default=None,
                   help='what the TP graph is rewritten to, e.g. "tp=4,attn_dp=1,mlp_tp=2" '
                   "(tp must equal --world-size); default tp=N,attn_dp=1 (replicated)")
    p.add_argument("--splits", metavar="ROWS", type=int_list(0), default=None,
                   help="rows per DP group, e.g. 1,3 (one number per group: --world-size / "
                   "attn_tp groups, summing to --batch); if not given, group 0 gets one row and "
                   "the others the rest")
    p.add_argument("--tolerance", metavar="TOL", type=float_in(0), default=1e-4,
                   help="largest allowed |logits difference| against transformers; with an FP8 "
                   "--checkpoint, of the rewritten graph against the TP graph per sequence (one "
                   "sequence may reach 5e-2: an e4m3 rounding flip), transformers on the "
                   "dequantized weights being held to 2^-3 relative in norm (docs/fp8.md)")
    p.add_argument("--seed", metavar="N", type=int_at_least(0), default=0,
                   help="weights (of a preset) and inputs seed")
    p.add_argument("--lower", action="store_true", help="also lower to the Triton ops and compare")
    p.add_argument("--no-self-check", action="store_true",
                   help="skip the rewrite's numeric self-check on the first layer (not advised)")
    p.add_argument("--log-dir", metavar="DIR", type=Path, default=None,
                   help="where the ranks' logs go; if not given, a new directory under the temp dir")
    p.add_argument("--dump-dir", metavar="DIR", type=Path, default=None,
                   help="write each stage's graph as text to DIR/rank<r>/ (01-capture.txt, "
                   "02-detect.txt: the plan, 03-rewrite.txt, ...); if not given, none")


def run(args: argparse.Namespace, stage) -> int:
    model = model_shape(args, DEFAULT_PRESET)
    if args.mapping is None:
        mapping = parse_mapping(f"tp={args.world_size},attn_dp=1", "--world-size")
    else:
        mapping = parse_mapping(args.mapping)
        if mapping.tp_size != args.world_size:
            raise UsageError(f"--mapping {args.mapping!r} has tp={mapping.tp_size} but "
                             f"--world-size is {args.world_size}: the mapping regroups the ranks "
                             "of the TP job", flag="--mapping",
                             hint=f"use --world-size {mapping.tp_size}, or tp={args.world_size}")
    flag = "--world-size" if args.mapping is None else "--mapping"
    check_model_fits_mapping(model, mapping, flag)
    if args.seq > model.max_position:
        what = f"--checkpoint {model.name}" if model.checkpoint else f"preset {model.preset}"
        raise UsageError(f"--seq {args.seq} is longer than {what}'s {model.max_position} "
                         "positions", flag="--seq",
                         hint=f"use --seq {model.max_position} or less")
    groups = mapping.dp_size
    if args.splits is not None and not mapping.enable_attention_dp:
        raise UsageError(f"--splits gives rows to DP groups, but mapping {mapping} has none "
                         "(attn_dp=0: every rank serves the whole batch)", flag="--splits",
                         hint="drop --splits, or set attn_dp=1")
    if args.splits is None:
        if args.batch < groups:
            raise UsageError(f"--batch {args.batch} is smaller than the {groups} DP groups: "
                             "the default split gives every group a row",
                             flag="--batch", hint="raise --batch, or give --splits (0 allowed)")
    elif len(args.splits) != groups or sum(args.splits) != args.batch:
        raise UsageError(
            f"--splits {','.join(map(str, args.splits))} must give each of the {groups} DP "
            f"groups its rows ({len(args.splits)} values given) and sum to "
            f"--batch {args.batch} (they sum to {sum(args.splits)})", flag="--splits")
    log_dir = args.log_dir
    if log_dir is not None:
        check_out_dir(log_dir, "--log-dir")
    if args.dump_dir is not None:
        check_out_dir(args.dump_dir, "--dump-dir")
    check_ranks_fit_machine(args.world_size, ranks_device(args))
    check_fp8_shards(model.checkpoint, mapping, flag)

    from adp_pass.launch import default_log_path
    from adp_pass.verify import verify

    log_dir = log_dir or default_log_path("verify", suffix="")
    print(f"verify: {model.label}, {args.world_size} ranks, mapping {mapping}, batch "
          f"{args.batch}x{args.seq}")
    with stage(f"parity on {args.world_size} ranks (rank logs: {log_dir})"):
        report = verify(model.config(), args.world_size, batch=args.batch,
                        seq=args.seq, splits=args.splits, seed=args.seed, lower_ops=args.lower,
                        log_dir=log_dir, self_check=not args.no_self_check, mapping=mapping,
                        dump_dir=args.dump_dir, checkpoint=model.checkpoint)
    print(report.plan_text)
    print()
    print(report)
    within, bounds = report.within(args.tolerance)
    # The replicated mapping keeps no collective; every other mapping keeps or inserts some.
    ok = within and (report.collectives_left == 0 or mapping.lockstep_size > 1)
    print(f"{'PASS' if ok else 'FAIL'} ({bounds}, {report.seconds:.1f} s)")
    print(f"rank logs: {log_dir}", file=sys.stderr)
    return 0 if ok else 1
