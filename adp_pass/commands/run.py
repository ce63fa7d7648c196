"""``adp run``: serve a batch of requests on the mapping's ranks (torchrun's; one rank: in this
process) and print what each rank generated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adp_pass.checks import check_requests
from adp_pass.commands.flags import (BLOCK_SIZE, add_model_flags, add_rank_flags,
                                     add_serving_flags, build_cache_dir, check_fp8_shards,
                                     check_job_dirs, check_ranks_fit_machine, float_in,
                                     kv_cache_settings,
                                     log_path,
                                     model_and_mapping, positive, ranks_device)


def add_parser(sub, common, fmt) -> None:
    p = sub.add_parser("run", parents=[common], formatter_class=fmt,
                       help="serve requests on attention-DP ranks (torchrun's; one rank: in "
                       "this process)",
                       description="Generation: requests are spread over the mapping's DP groups "
                       "by load (each of the --world-size ranks its own group unless --mapping "
                       "says otherwise); each rank builds its own rewritten model and serves its "
                       "group's requests from a paged KV cache.")
    add_model_flags(p)
    add_rank_flags(p, '"tp=4,attn_dp=1,mlp_tp=2" form or a .json/.toml file; its tp is the '
                   "number of ranks. If not given: tp=--world-size,attn_dp=1 (replicated weights, "
                   "every rank its own requests)")
    p.add_argument("--prompt", metavar="TEXT", action="append", default=None,
                   help="a prompt text (repeatable); tokenized with the checkpoint's tokenizer, "
                   "or bytes as ids for a preset. Without it: --requests random prompts")
    p.add_argument("--requests", metavar="N", type=positive, default=4,
                   help="random prompts to serve when no --prompt is given")
    p.add_argument("--prompt-len", metavar="N", type=positive, default=8, help="tokens per random prompt")
    p.add_argument("--new-tokens", metavar="N", type=positive, default=8, help="tokens to generate per request")
    p.add_argument("--temperature", metavar="T", type=float_in(0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", metavar="P", type=float_in(0, 1, low_open=True), default=1.0,
                   help="nucleus sampling mass")
    add_serving_flags(p)
    p.add_argument("--dump-dir", metavar="DIR", type=Path, default=None,
                   help="write each stage's graph as text to DIR/rank<r>/ (01-capture.txt ... "
                   "06-cache.txt; a rank loaded from the build cache: 01-load.txt); if not given, "
                   "none")
    p.add_argument("--torchrun", action="store_true",
                   help="start the ranks from a torchrun subprocess, each in a process of its "
                   "own, even the one rank of --world-size 1 (which otherwise runs in this "
                   "process, seconds sooner)")


def run(args: argparse.Namespace, stage) -> int:
    preset, vocab, max_position, mapping = model_and_mapping(args)
    world_size = mapping.world_size
    tokenizer = None
    if args.prompt is not None:
        from adp_pass.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.checkpoint)
        prompts = [tokenizer.encode(text) for text in args.prompt]
    else:
        prompts = [[0] * args.prompt_len] * args.requests  # lengths only: ids are drawn later
    check_requests(prompts, args.new_tokens, vocab_size=vocab, max_position=max_position,
                   num_blocks=args.num_blocks, block_size=BLOCK_SIZE)
    kv_cache = kv_cache_settings(args)
    check_job_dirs(args)
    check_ranks_fit_machine(world_size, ranks_device(args))
    check_fp8_shards(args.checkpoint, mapping, "--mapping" if args.mapping else "--world-size")

    from adp_pass.runtime.contract import Request, SamplingParams
    from adp_pass.runtime.frontend import assign_by_load, make_job, run_job, synthetic_requests
    from adp_pass.runtime.serving_config import ServingConfig

    params = SamplingParams(args.new_tokens, args.temperature, args.top_p)
    if tokenizer is not None:
        requests = [Request(f"prompt-{i}", ids, params) for i, ids in enumerate(prompts)]
    else:
        requests = synthetic_requests(args.requests, args.prompt_len, params, vocab)
    longest = max(len(r.prompt) for r in requests) + args.new_tokens
    serving = ServingConfig(
        num_blocks=args.num_blocks, block_size=BLOCK_SIZE,
        max_position=min(longest + 16, max_position), max_seq_len=longest,
        # argparse parses a string default with its type
        cuda_graph_sizes=tuple(args.cuda_graphs or ()), **kv_cache)
    job = make_job(
        mapping, assign_by_load(requests, mapping.dp_size), preset=preset,
        checkpoint=str(args.checkpoint) if args.checkpoint else None, dtype=args.dtype,
        serving=serving, cache_dir=build_cache_dir(args),
        dump_dir=str(args.dump_dir) if args.dump_dir is not None else None,
    )
    log = log_path(args)
    groups = (f" in {mapping.dp_size} DP group{'s' * (mapping.dp_size != 1)} ({mapping})"
              if mapping.dp_size < world_size else "")
    where = "torchrun" if args.torchrun or world_size > 1 else "in this process"
    print(f"run: {len(requests)} requests over {world_size} ranks{groups} ({where})", flush=True)
    with stage(f"serve on {world_size} ranks (log: {log})"):
        report = run_job(job, world_size, log_path=log, torchrun=args.torchrun)
    texts = dict(zip((r.request_id for r in requests), args.prompt or []))
    for rank in report.leaders:  # the other ranks of a DP group served the same requests
        for result in rank.results:
            tokens, rid = result.tokens, result.request_id
            if tokenizer is not None:
                print(f"  rank {rank.rank} {rid}: {texts[rid]!r} -> "
                      f"{tokenizer.decode(tokens)!r} ({result.finish_reason})")
                print(f"      ids {tokens}")
            else:
                print(f"  rank {rank.rank} {rid}: {tokens} ({result.finish_reason})")
    print(report)
    print(f"rank logs: {report.log}", file=sys.stderr)
    return 0
