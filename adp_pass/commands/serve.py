"""``adp serve`` (the OpenAI API over persistent ranks) and ``adp bench-serve`` (a load test of
any OpenAI server); the server itself is adp_pass/serving/ (docs/serving.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from adp_pass.checks import check_out_file
from adp_pass.commands.flags import (BLOCK_SIZE, add_model_flags, add_rank_flags,
                                     add_serving_flags, api_key, build_cache_dir,
                                     check_fp8_shards, check_job_dirs,
                                     check_ranks_fit_machine, float_in, int_at_least,
                                     kv_cache_settings, log_path,
                                     model_and_mapping, origin_list, port_number, positive,
                                     ranks_device, served_name)
from adp_pass.errors import UsageError


def add_parser(sub, common, fmt) -> None:
    p = sub.add_parser("serve", parents=[common], formatter_class=fmt,
                       help="serve the OpenAI API (completions, chat) over persistent ranks",
                       description="Start the ranks once (torchrun) and serve /v1/completions, "
                       "/v1/chat/completions, /v1/models, /health and /metrics over HTTP until "
                       "SIGTERM or Ctrl-C. Each request goes to the DP group with the fewest "
                       "tokens in flight. See docs/serving.md.")
    add_model_flags(p)
    add_rank_flags(p, '"tp=2,attn_dp=1,mlp_tp=2" form or a .json/.toml file; if not given: '
                   "tp=--world-size,attn_dp=1 (replicated: a rank that dies fails only its own "
                   "requests)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", metavar="N", type=port_number, default=8000, help="HTTP port")
    p.add_argument("--served-model-name", metavar="NAME", type=served_name, default=None,
                   help="the model name clients send; if not given, the preset name or the "
                   "--checkpoint path as typed")
    add_serving_flags(p, "; a request needs prompt + max_tokens of them, reserved when it "
                      "starts")
    p.add_argument("--max-model-len", metavar="N", type=positive, default=None,
                   help="longest prompt + completion; if not given, the model's positions, "
                   "capped to one rank's KV cache")
    p.add_argument("--max-batch", metavar="N", type=positive, default=64,
                   help="requests a rank decodes together; more wait in its queue")
    p.add_argument("--max-queue", metavar="N", type=positive, default=256,
                   help="requests waiting per DP group before new ones get 429 + Retry-After")
    p.add_argument("--seed", metavar="N", type=int_at_least(0), default=0,
                   help="weights seed (presets) and the ranks' sampling seed")
    p.add_argument("--nnodes", metavar="N", type=positive, default=1,
                   help="torchrun agents (one per node) meeting at a c10d rendezvous; collective "
                   "mappings only. Without --node-rank all of them run on this host "
                   "(docs/serving.md, multi-node)")
    p.add_argument("--node-rank", metavar="N", type=int_at_least(0), default=None,
                   help="with --nnodes: start only this machine's agent; node 0 also serves HTTP, "
                   "the others join it (same arguments, ADP_SERVE_TOKEN set alike on all)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", default=None,
                   help="with --node-rank: the c10d rendezvous, on node 0's address")
    p.add_argument("--link-port", metavar="N", type=port_number, default=None,
                   help="with --node-rank: the port on node 0 where every rank connects to the "
                   "front end (at the --rdzv-endpoint host)")
    p.add_argument("--start-timeout", metavar="S", type=float_in(0, low_open=True),
                   default=1800.0, help="seconds the ranks may take to build and load")
    p.add_argument("--rank-timeout", metavar="S", type=float_in(0, low_open=True),
                   default=600.0, help="a rank that sends nothing for this long is taken as hung "
                   "and killed (it reports every step, and every 0.5 s when idle); allow for the "
                   "first step's kernel compilation")
    p.add_argument("--shutdown-timeout", metavar="S", type=float_in(0), default=30.0,
                   help="on SIGTERM, seconds the requests in flight may take to finish before "
                   "they get an error")
    p.add_argument("--restart-attempts", metavar="N", type=int_at_least(0), default=3,
                   help="starts tried when a rank of a group dies (the whole group restarts, "
                   "from the build cache; its requests in flight get 503); 0: never")
    p.add_argument("--restart-backoff", metavar="S", type=float_in(0, low_open=True),
                   default=1.0, help="seconds before the first restart; doubled after each "
                   "failed one")
    p.add_argument("--restart-backoff-max", metavar="S", type=float_in(0, low_open=True),
                   default=30.0, help="the longest wait between two restarts")
    p.add_argument("--api-key", metavar="KEY", type=api_key, action="append", default=None,
                   help="clients must send 'Authorization: Bearer KEY' on /v1/* and /metrics "
                   "(repeatable: several keys; also $ADP_API_KEY, comma-separated); if not "
                   "given, no key is needed (docs/serving.md, Security)")
    p.add_argument("--metrics-public", action="store_true",
                   help="with --api-key: serve /metrics without a key (to a scraper)")
    p.add_argument("--allowed-origins", metavar="ORIGINS", type=origin_list, default=None,
                   help="web pages (https://app.example,...; * for any) whose scripts may call "
                   "the API from a browser (CORS); if not given, none")
    p.add_argument("--ssl-keyfile", metavar="FILE", type=Path, default=None,
                   help="serve HTTPS with this private key (PEM), with --ssl-certfile")
    p.add_argument("--ssl-certfile", metavar="FILE", type=Path, default=None,
                   help="serve HTTPS with this certificate chain (PEM), with --ssl-keyfile")
    p.add_argument("--read-timeout", metavar="S", type=float_in(0, low_open=True), default=30.0,
                   help="seconds a client may take to send a request's headers, and again its "
                   "body, before it gets 408")
    p.add_argument("--keep-alive-timeout", metavar="S", type=float_in(0, low_open=True),
                   default=5.0, help="seconds an idle connection is kept open")


    p = sub.add_parser("bench-serve", parents=[common], formatter_class=fmt,
                       help="benchmark a running 'adp serve' (or any OpenAI server): Poisson "
                       "arrivals, throughput, TTFT / TPOT / ITL",
                       description="Send --num-prompts streaming completions of --input-len "
                       "random token ids to --url, arriving as a Poisson process of --rate "
                       "requests/s, each generating exactly --output-len tokens (ignore_eos); "
                       "report throughput and TTFT, TPOT, ITL and latency mean/p50/p99.")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server's base URL (a trailing /v1 is allowed)")
    p.add_argument("--model", default=None, help="model name; if not given, the server's first")
    p.add_argument("--rate", metavar="R", type=float_in(0, low_open=True), default=math.inf,
                   help="requests per second (Poisson); inf: all at once")
    p.add_argument("--num-prompts", metavar="N", type=positive, default=100, help="requests")
    p.add_argument("--input-len", metavar="N", type=positive, default=None,
                   help="prompt tokens per request; if not given, 512, or 3/4 of the server's "
                   "max_model_len when 512 + --output-len does not fit it")
    p.add_argument("--output-len", metavar="N", type=positive, default=None,
                   help="tokens generated per request; if not given, 128, or the rest of the "
                   "server's max_model_len after --input-len")
    p.add_argument("--max-concurrency", metavar="N", type=positive, default=None,
                   help="requests in flight at most; if not given, no limit")
    p.add_argument("--seed", metavar="N", type=int_at_least(0), default=0,
                   help="prompts and arrival times")
    p.add_argument("--timeout", metavar="S", type=float_in(0, low_open=True), default=600.0,
                   help="seconds one request may take")
    p.add_argument("--out", metavar="FILE", type=Path, default=None,
                   help="also write the results (and every request's figures) as JSON")
    p.add_argument("--force", action="store_true",
                   help="let --out replace an existing file that is not a bench-serve report")


def run(args: argparse.Namespace, stage) -> int:
    preset, vocab, positions, mapping = model_and_mapping(args)
    kv_tokens = args.num_blocks * BLOCK_SIZE
    if args.max_model_len is not None and args.max_model_len > positions:
        raise UsageError(f"--max-model-len {args.max_model_len} is longer than the model's "
                         f"{positions} positions", flag="--max-model-len",
                         hint=f"use --max-model-len {positions} or less")
    if args.max_model_len is not None and args.max_model_len > kv_tokens:
        raise UsageError(f"--max-model-len {args.max_model_len} does not fit one rank's KV cache "
                         f"(--num-blocks {args.num_blocks} x {BLOCK_SIZE} = {kv_tokens} tokens)",
                         flag="--max-model-len",
                         hint=f"raise --num-blocks to {-(-args.max_model_len // BLOCK_SIZE)} or "
                         f"lower --max-model-len to {kv_tokens}")
    max_model_len = args.max_model_len or min(positions, kv_tokens)
    if args.nnodes > 1:
        if mapping.lockstep_size == 1:
            raise UsageError(f"--nnodes {args.nnodes}: mapping {mapping} is replicated, and "
                             "its ranks are started one torchrun job each already", flag="--nnodes",
                             hint="drop --nnodes, or serve a mapping with collectives")
        if mapping.world_size % args.nnodes:
            raise UsageError(f"--nnodes {args.nnodes} does not divide the {mapping.world_size} "
                             "ranks", flag="--nnodes", hint="give a divisor of the world size")
    if args.restart_backoff_max < args.restart_backoff:
        raise UsageError(f"--restart-backoff-max {args.restart_backoff_max:g} is shorter than "
                         f"--restart-backoff {args.restart_backoff:g}", flag="--restart-backoff-max",
                         hint="give the longest wait, at least the first one")
    kv_cache = kv_cache_settings(args)
    node = _node_spec(args)
    api_keys = _serve_security(args, http=node is None or node.node_rank == 0)
    check_job_dirs(args)
    if args.checkpoint is not None:
        from adp_pass.tokenizer import HFTokenizer, load_tokenizer

        if not any((args.checkpoint / name).is_file() for name in HFTokenizer.FILES):
            raise UsageError(f"--checkpoint {args.checkpoint} has no tokenizer "
                             f"({', '.join(HFTokenizer.FILES)}): adp serve needs it for text "
                             "prompts, the chat template and the end-of-text token",
                             flag="--checkpoint", hint="copy the tokenizer files into it "
                             "(tokenizer.save_pretrained(dir))")
        load_tokenizer(args.checkpoint)  # one that cannot load fails here, at once
    if node is None or node.node_rank == 0:
        _check_port_free(args.host, args.port)
    if node is not None and node.node_rank == 0:
        _check_port_free("0.0.0.0", node.link_port, "--link-port")
    check_ranks_fit_machine(mapping.world_size // (args.nnodes if node else 1),
                             ranks_device(args))
    check_fp8_shards(args.checkpoint, mapping, "--mapping" if args.mapping else "--world-size")

    from adp_pass.serving.guard import HTTPLimits
    from adp_pass.serving.server import ServeOptions, serve

    log = log_path(args, "serve")
    what = (f"node {node.node_rank}: {mapping.world_size // args.nnodes} ranks joining the front "
            f"end at {node.front_end}" if node and node.node_rank else
            f"serve on {mapping.world_size} ranks, http://{args.host}:{args.port}")
    options = ServeOptions(
        mapping=mapping, model_name=args.served_model_name or (
            str(args.checkpoint) if args.checkpoint else preset),
        vocab_size=vocab, max_model_len=max_model_len, preset=preset,
        checkpoint=str(args.checkpoint) if args.checkpoint else None, host=args.host,
        port=args.port, dtype=args.dtype, **kv_cache, num_blocks=args.num_blocks,
        block_size=BLOCK_SIZE,
        max_batch=args.max_batch, max_queue=args.max_queue,
        cuda_graph_sizes=tuple(args.cuda_graphs), seed=args.seed,
        cache_dir=build_cache_dir(args),
        log_path=log, start_timeout_s=args.start_timeout,
        shutdown_timeout_s=args.shutdown_timeout, rank_timeout_s=args.rank_timeout,
        nnodes=args.nnodes, node=node, api_keys=api_keys, metrics_public=args.metrics_public,
        allowed_origins=tuple(args.allowed_origins or ()),
        ssl_keyfile=str(args.ssl_keyfile) if args.ssl_keyfile else None,
        ssl_certfile=str(args.ssl_certfile) if args.ssl_certfile else None,
        restart_attempts=args.restart_attempts, restart_backoff_s=args.restart_backoff,
        restart_backoff_max_s=args.restart_backoff_max,
        limits=HTTPLimits(read_timeout_s=args.read_timeout,
                          keep_alive_timeout_s=args.keep_alive_timeout))
    with stage(what):
        return _serve(serve, options)


def _serve_security(args: argparse.Namespace, http: bool) -> tuple[str, ...]:
    """The API keys (--api-key and $ADP_API_KEY), checked with TLS and CORS; a server that other
    machines can reach without a key is warned about. The keys are never printed."""
    keys = list(args.api_key or [])
    # Read once and dropped: the ranks, which inherit this environment, have no use for it.
    for key in os.environ.pop("ADP_API_KEY", "").split(","):
        if key.strip():
            try:
                keys.append(api_key(key.strip()))
            except argparse.ArgumentTypeError as err:
                raise UsageError(f"ADP_API_KEY: a key {err}", flag="--api-key",
                                 hint="set ADP_API_KEY to one key, or several separated by "
                                 "commas") from None
    if args.metrics_public and not keys:
        raise UsageError("--metrics-public opens /metrics on a server that needs no key anyway",
                         flag="--metrics-public", hint="drop it, or add --api-key")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise UsageError("give --ssl-keyfile and --ssl-certfile together", flag="--ssl-keyfile",
                         hint="both PEM files: the private key and its certificate chain")
    if args.ssl_certfile is not None:
        import ssl

        for flag, path in (("--ssl-certfile", args.ssl_certfile),
                           ("--ssl-keyfile", args.ssl_keyfile)):
            if not path.is_file():
                raise UsageError(f"{flag} {path} is not a file", flag=flag,
                                 hint="give the PEM file's path")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.ssl_certfile,
                                                                    args.ssl_keyfile)
        except (ssl.SSLError, OSError) as err:
            raise UsageError(f"--ssl-certfile {args.ssl_certfile} with --ssl-keyfile "
                             f"{args.ssl_keyfile} cannot be loaded: {err}",
                             flag="--ssl-certfile", hint="give a PEM certificate chain and the "
                             "private key that belongs to it (unencrypted)") from None
    from adp_pass.serving.guard import is_loopback

    if http and not keys and not is_loopback(args.host):
        print(f"adp serve: warning: --host {args.host} is reachable from other machines and no "
              "--api-key is set: anyone who reaches the port can use the model", file=sys.stderr,
              flush=True)
    return tuple(keys)


def _node_spec(args: argparse.Namespace):
    """``--node-rank``: this machine's part of a job over several (None: every rank here)."""
    if args.node_rank is None:
        for flag, value in (("--rdzv-endpoint", args.rdzv_endpoint),
                            ("--link-port", args.link_port)):
            if value is not None:
                raise UsageError(f"{flag} is for a job over several machines: give --node-rank "
                                 "(and --nnodes) with it", flag=flag,
                                 hint="drop it, or add --nnodes N --node-rank R")
        return None
    if args.nnodes < 2 or args.node_rank >= args.nnodes:
        raise UsageError(f"--node-rank {args.node_rank} needs --nnodes above it (got --nnodes "
                         f"{args.nnodes})", flag="--node-rank",
                         hint="number the machines 0 .. --nnodes - 1; node 0 serves HTTP")
    missing = [f for f, v in (("--rdzv-endpoint", args.rdzv_endpoint),
                              ("--link-port", args.link_port)) if v is None]
    if missing:
        raise UsageError(f"--node-rank needs {' and '.join(missing)}", flag="--node-rank",
                         hint="e.g. --rdzv-endpoint NODE0:29400 --link-port 29401, the same on "
                         "every node")
    host, _, port = args.rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--rdzv-endpoint {args.rdzv_endpoint!r} is not HOST:PORT",
                         flag="--rdzv-endpoint", hint="e.g. --rdzv-endpoint 10.0.0.1:29400")
    token = os.environ.get("ADP_SERVE_TOKEN", "")
    if len(token) < 16:
        raise UsageError("--node-rank: ADP_SERVE_TOKEN is not set (or shorter than 16 "
                         "characters); the ranks of every node prove they belong to this job "
                         "with it", flag="--node-rank",
                         hint="export ADP_SERVE_TOKEN=$(openssl rand -hex 16) with the same "
                         "value on every node")
    from adp_pass.serving.ranks import NodeSpec

    return NodeSpec(args.node_rank, args.rdzv_endpoint, args.link_port, token)


def _serve(serve, options) -> int:
    code = serve(options)
    if code:  # the server already said why (a rank died under a collective mapping)
        raise SystemExit(code)
    return code


def _check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Before the ranks start: a port in use would only show after minutes of building."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UsageError(f"{flag} {port} on {host} cannot be used: {err.strerror}",
                             flag=flag, hint=f"stop what listens there, or pick another "
                             f"{flag}") from None


def run_bench(args: argparse.Namespace, stage) -> int:
    from adp_pass.serving.bench import REPORT_KEYS, base_url, bench_serve, format_report

    url = base_url(args.url)
    if args.out is not None:
        check_out_file(args.out, "--out", force=args.force, marks=REPORT_KEYS)

    key = os.environ.get("ADP_API_KEY", "").split(",")[0].strip()  # never another service's key
    report = bench_serve(url, api_key=key or None, model=args.model, rate=args.rate,
                         num_prompts=args.num_prompts, input_len=args.input_len,
                         output_len=args.output_len, max_concurrency=args.max_concurrency,
                         seed=args.seed, timeout_s=args.timeout, out=args.out)
    print(format_report(report))
    return 0 if report["completed"] == args.num_prompts else 1
