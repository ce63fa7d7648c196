"""adp: rewrite tensor-parallel Qwen3 graphs into attention-data-parallel form.

verify checks parity on real ranks, rewrite shows one rank's rewrite, run serves requests on
attention-DP ranks; plan predicts every mapping's decode step and picks one, calibrate measures
the machine's constants for it. Inputs are checked before any expensive work; errors are a few
lines that name the problem and the fix (exit 2: fix the command line, 1: a failure; --debug:
traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

# Nothing imported here loads torch or transformers: `adp --help` and every input error must
# answer at once. The commands import them after validation.
from adp_pass.checks import (
    CALIBRATION_KEYS, check_checkpoint, check_out_dir, check_out_file, check_requests)
from adp_pass.errors import AdpError, UsageError
from adp_pass.mapping import Mapping, MappingError
from adp_pass.presets import PRESETS
from adp_pass.quantize_cli import add_quantize_parser, cmd_quantize
from adp_pass.quick_exit import exit_without_teardown
from adp_pass.runtime.serving_config import ServingConfig

BLOCK_SIZE = ServingConfig.block_size  # the serving job's KV-cache block size, defined once
DEFAULT_MAPPING = "tp=2,attn_dp=1"
MAX_MESSAGE_LINES = 3  # of one error's message; the rest is in the rank log / --debug


# ----------------------------------------------------------------------------- argument types
class _Parser(argparse.ArgumentParser):
    """Bad flags raise a UsageError, reported by ``main`` like every other error (argparse's
    own report prints the whole usage block first)."""

    def error(self, message: str):
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            left = "(" if low_open else "["
            right = "]" if math.isfinite(high) else ")"
            raise argparse.ArgumentTypeError(f"must be in {left}{low:g}, {high:g}{right}, "
                                             f"got {text}")
        return value

    return parse


def _int_list(low: int, *, allow_empty: bool = False):
    def parse(text: str) -> list[int]:
        items = [t.strip() for t in text.split(",")] if text.strip() else []
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError("expected comma-separated integers, got nothing")
        try:
            values = [int(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}") from None
        if any(v < low for v in values):
            raise argparse.ArgumentTypeError(f"every value must be >= {low}, got {text!r}")
        return values

    return parse


_positive = _int_at_least(1)


def _port(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1..65535, got {value}")
    return value


def _name(text: str) -> str:
    """A name clients send back (``--served-model-name``): not empty, no control characters."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty: clients send it as 'model'")
    if text != text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be printable, without leading or trailing "
                                         f"spaces, got {text!r}")
    return text


def _api_key(text: str) -> str:
    """A key sent in an HTTP header: printable ASCII, no spaces (the value is never echoed)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    if not (text.isascii() and text.isprintable()) or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("must be printable ASCII without spaces (it travels "
                                         "in the Authorization header)")
    return text


def _origins(text: str) -> list[str]:
    origins = [o.strip().rstrip("/") for o in text.split(",") if o.strip()]
    if not origins:
        raise argparse.ArgumentTypeError("expected comma-separated origins, got nothing")
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"an origin is scheme://host[:port] (or *), got "
                                             f"{origin!r}")
    return origins


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    common = _Parser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite `adp --debug CMD`.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, also print the traceback")
    parser = _Parser(prog="adp", description=__doc__, formatter_class=fmt)
    parser.add_argument("--debug", action="store_true", help="on an error, also print the traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("verify", parents=[common], formatter_class=fmt,
                       help="rewrite a preset with random weights, run it on real ranks, check "
                       "parity with transformers",
                       description="Rewrite a preset (random weights) for --world-size ranks, run "
                       "the TP and the attention-DP graphs on real ranks (gloo on CPU, NCCL on "
                       "GPU) and compare both with transformers.")
    p.add_argument("--preset", metavar="NAME", default="small", choices=sorted(PRESETS), help="model shape: %(choices)s")
    p.add_argument("--world-size", metavar="N", type=_positive, default=2,
                   help="ranks to start; also the TP degree the graph is traced with")
    _add_device_arg(p)
    p.add_argument("--batch", metavar="N", type=_positive, default=4, help="sequences in the test batch")
    p.add_argument("--seq", metavar="N", type=_positive, default=16, help="tokens per sequence")
    p.add_argument("--mapping", metavar="SPEC", default=None,
                   help='what the TP graph is rewritten to, e.g. "tp=4,attn_dp=1,mlp_tp=2" '
                   "(tp must equal --world-size); default tp=N,attn_dp=1 (replicated)")
    p.add_argument("--splits", metavar="ROWS", type=_int_list(0), default=None,
                   help="rows per DP group, e.g. 1,3 (one number per group: --world-size / "
                   "attn_tp groups, summing to --batch); if not given, group 0 gets one row and "
                   "the others the rest")
    p.add_argument("--tolerance", metavar="TOL", type=_float_in(0), default=1e-4,
                   help="largest allowed |logits difference|")
    p.add_argument("--seed", metavar="N", type=_int_at_least(0), default=0, help="weights and inputs seed")
    p.add_argument("--lower", action="store_true", help="also lower to the Triton ops and compare")
    p.add_argument("--no-self-check", action="store_true",
                   help="skip the rewrite's numeric self-check on the first layer (not advised)")
    p.add_argument("--log-dir", metavar="DIR", type=Path, default=None,
                   help="where the ranks' logs go; if not given, a new directory under the temp dir")
    p.add_argument("--dump-dir", metavar="DIR", type=Path, default=None,
                   help="write each stage's graph as text to DIR/rank<r>/ (01-capture.txt, "
                   "02-detect.txt: the plan, 03-rewrite.txt, ...); if not given, none")

    p = sub.add_parser("rewrite", parents=[common], formatter_class=fmt,
                       help="capture, detect and rewrite one rank's graph; print a summary",
                       description="Trace one rank of a TP job on a fake process group, find the "
                       "collectives and rewrite the graph to attention-DP. Prints a summary; "
                       "-v prints the full plan, --out writes it with both graphs and a picture.")
    p.add_argument("--preset", metavar="NAME", default="small", choices=sorted(PRESETS), help="model shape: %(choices)s")
    p.add_argument("--mapping", metavar="SPEC", default=DEFAULT_MAPPING,
                   help='"tp=8,attn_dp=1" form (keys world, tp, attn_dp, attn_tp, mlp_tp), or a '
                   ".json/.toml file with the same keys")
    p.add_argument("--rank", metavar="N", type=_int_at_least(0), default=0, help="which TP rank to trace")
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

    p = sub.add_parser("run", parents=[common], formatter_class=fmt,
                       help="serve requests on attention-DP ranks (torchrun's; one rank: in "
                       "this process)",
                       description="Generation: requests are spread over the mapping's DP groups "
                       "by load (each of the --world-size ranks its own group unless --mapping "
                       "says otherwise); each rank builds its own rewritten model and serves its "
                       "group's requests from a paged KV cache.")
    p.add_argument("--preset", metavar="NAME", default=None, choices=sorted(PRESETS),
                   help="model shape with random weights: %(choices)s; if not given, tiny (or the "
                   "--checkpoint's)")
    p.add_argument("--checkpoint", metavar="DIR", type=Path, default=None,
                   help="Hugging Face Qwen3 checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--world-size", metavar="N", type=_positive, default=None,
                   help="ranks (each its own requests); if not given, 2 (or the --mapping's tp)")
    _add_device_arg(p)
    p.add_argument("--mapping", metavar="SPEC", default=None,
                   help='"tp=4,attn_dp=1,mlp_tp=2" form or a .json/.toml file; its tp is the '
                   "number of ranks. If not given: tp=--world-size,attn_dp=1 (replicated weights, "
                   "every rank its own requests)")
    p.add_argument("--prompt", metavar="TEXT", action="append", default=None,
                   help="a prompt text (repeatable); tokenized with the checkpoint's tokenizer, "
                   "or bytes as ids for a preset. Without it: --requests random prompts")
    p.add_argument("--requests", metavar="N", type=_positive, default=4,
                   help="random prompts to serve when no --prompt is given")
    p.add_argument("--prompt-len", metavar="N", type=_positive, default=8, help="tokens per random prompt")
    p.add_argument("--new-tokens", metavar="N", type=_positive, default=8, help="tokens to generate per request")
    p.add_argument("--temperature", metavar="T", type=_float_in(0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", metavar="P", type=_float_in(0, 1, low_open=True), default=1.0,
                   help="nucleus sampling mass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations")
    p.add_argument("--num-blocks", metavar="N", type=_positive, default=256,
                   help=f"KV-cache blocks per rank ({BLOCK_SIZE} tokens each)")
    p.add_argument("--cuda-graphs", metavar="SIZES", type=_int_list(1, allow_empty=True), default="1,2,4,8,16,32,64",
                   help="decode batch sizes captured as CUDA graphs (GPU only; empty: none)")
    p.add_argument("--log-dir", metavar="DIR", type=Path, default=None,
                   help="where the ranks' log goes; if not given, a file under the temp dir")
    p.add_argument("--cache-dir", metavar="DIR", type=Path, default=None,
                   help="build cache: each rank loads its built graph from here, or builds and "
                   "stores it (docs/build_cache.md); if not given, $XDG_CACHE_HOME/adp-pass or "
                   "~/.cache/adp-pass")
    p.add_argument("--no-cache", action="store_true",
                   help="build every rank's graph; read and write no build cache")
    p.add_argument("--dump-dir", metavar="DIR", type=Path, default=None,
                   help="write each stage's graph as text to DIR/rank<r>/ (01-capture.txt ... "
                   "06-cache.txt; a rank loaded from the build cache: 01-load.txt); if not given, "
                   "none")
    p.add_argument("--torchrun", action="store_true",
                   help="start the ranks from a torchrun subprocess, each in a process of its "
                   "own, even the one rank of --world-size 1 (which otherwise runs in this "
                   "process, seconds sooner)")

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
    p.add_argument("--gpus", metavar="N", type=_positive, default=8,
                   help="GPUs of the job (the TP degree of every mapping)")
    p.add_argument("--batch-per-gpu", metavar="N", type=_positive, default=64,
                   help="requests per GPU (a TP group of N GPUs serves N times as many)")
    p.add_argument("--prompt", metavar="TOKENS", type=_positive, default=512,
                   help="prompt tokens per request")
    p.add_argument("--new-tokens", metavar="N", type=_positive, default=128,
                   help="tokens generated per request")
    from adp_pass.plan_cli import add_plan_arguments  # torch-free

    add_plan_arguments(p)

    p = sub.add_parser("calibrate", parents=[common], formatter_class=fmt,
                       help="measure this machine's constants for 'adp plan' (bandwidths, GEMM "
                       "rate, collectives)",
                       description="Measure the cost model's constants on this machine: copy "
                       "bandwidth, bf16 GEMM rate at decode shapes, decode attention bandwidth, "
                       "small-kernel time, and all-reduce / all-gather / reduce-scatter latency "
                       "and bus bandwidth for every group size 2..--gpus (ranks started by "
                       "torchrun: NCCL on GPUs, gloo ranks on a CPU-only machine, small sizes). "
                       "Writes JSON for 'adp plan --calibration'.")
    p.add_argument("--out", metavar="FILE", type=Path, required=True,
                   help="the calibration JSON to write")
    p.add_argument("--gpus", metavar="N", type=_positive, default=None,
                   help="ranks for the collectives (one per GPU); if not given, every GPU, or 2 "
                   "gloo ranks without a GPU")
    p.add_argument("--timeout", metavar="S", type=_float_in(0, low_open=True), default=120.0,
                   help="seconds any one collective may wait; a lost rank fails the job")
    p.add_argument("--force", action="store_true",
                   help="let --out replace an existing file that is not a calibration")
    _add_serve_parsers(sub, common, fmt)
    add_quantize_parser(sub, common, fmt)
    return parser


def _add_serve_parsers(sub, common, fmt) -> None:
    """``adp serve`` and ``adp bench-serve`` (docs/serving.md)."""
    p = sub.add_parser("serve", parents=[common], formatter_class=fmt,
                       help="serve the OpenAI API (completions, chat) over persistent ranks",
                       description="Start the ranks once (torchrun) and serve /v1/completions, "
                       "/v1/chat/completions, /v1/models, /health and /metrics over HTTP until "
                       "SIGTERM or Ctrl-C. Each request goes to the DP group with the fewest "
                       "tokens in flight. See docs/serving.md.")
    p.add_argument("--preset", metavar="NAME", default=None, choices=sorted(PRESETS),
                   help="model shape with random weights: %(choices)s; if not given, tiny (or the "
                   "--checkpoint's)")
    p.add_argument("--checkpoint", metavar="DIR", type=Path, default=None,
                   help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--world-size", metavar="N", type=_positive, default=None,
                   help="ranks; if not given, 2 (or the --mapping's tp)")
    _add_device_arg(p)
    p.add_argument("--mapping", metavar="SPEC", default=None,
                   help='"tp=2,attn_dp=1,mlp_tp=2" form or a .json/.toml file; if not given: '
                   "tp=--world-size,attn_dp=1 (replicated: a rank that dies fails only its own "
                   "requests)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", metavar="N", type=_port, default=8000, help="HTTP port")
    p.add_argument("--served-model-name", metavar="NAME", type=_name, default=None,
                   help="the model name clients send; if not given, the preset name or the "
                   "--checkpoint path as typed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations")
    p.add_argument("--num-blocks", metavar="N", type=_positive, default=256,
                   help=f"KV-cache blocks per rank ({BLOCK_SIZE} tokens each); a request needs "
                   "prompt + max_tokens of them, reserved when it starts")
    p.add_argument("--max-model-len", metavar="N", type=_positive, default=None,
                   help="longest prompt + completion; if not given, the model's positions, "
                   "capped to one rank's KV cache")
    p.add_argument("--max-batch", metavar="N", type=_positive, default=64,
                   help="requests a rank decodes together; more wait in its queue")
    p.add_argument("--max-queue", metavar="N", type=_positive, default=256,
                   help="requests waiting per DP group before new ones get 429 + Retry-After")
    p.add_argument("--cuda-graphs", metavar="SIZES", type=_int_list(1, allow_empty=True),
                   default="1,2,4,8,16,32,64",
                   help="decode batch sizes captured as CUDA graphs (GPU only; empty: none)")
    p.add_argument("--seed", metavar="N", type=_int_at_least(0), default=0,
                   help="weights seed (presets) and the ranks' sampling seed")
    p.add_argument("--nnodes", metavar="N", type=_positive, default=1,
                   help="torchrun agents (one per node) meeting at a c10d rendezvous; collective "
                   "mappings only. Without --node-rank all of them run on this host "
                   "(docs/serving.md, multi-node)")
    p.add_argument("--node-rank", metavar="N", type=_int_at_least(0), default=None,
                   help="with --nnodes: start only this machine's agent; node 0 also serves HTTP, "
                   "the others join it (same arguments, ADP_SERVE_TOKEN set alike on all)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", default=None,
                   help="with --node-rank: the c10d rendezvous, on node 0's address")
    p.add_argument("--link-port", metavar="N", type=_port, default=None,
                   help="with --node-rank: the port on node 0 where every rank connects to the "
                   "front end (at the --rdzv-endpoint host)")
    p.add_argument("--start-timeout", metavar="S", type=_float_in(0, low_open=True),
                   default=1800.0, help="seconds the ranks may take to build and load")
    p.add_argument("--rank-timeout", metavar="S", type=_float_in(0, low_open=True),
                   default=600.0, help="a rank that sends nothing for this long is taken as hung "
                   "and killed (it reports every step, and every 0.5 s when idle); allow for the "
                   "first step's kernel compilation")
    p.add_argument("--shutdown-timeout", metavar="S", type=_float_in(0), default=30.0,
                   help="on SIGTERM, seconds the requests in flight may take to finish before "
                   "they get an error")
    p.add_argument("--log-dir", metavar="DIR", type=Path, default=None,
                   help="where the ranks' log goes; if not given, a file under the temp dir")
    p.add_argument("--cache-dir", metavar="DIR", type=Path, default=None,
                   help="build cache of the ranks' graphs (docs/build_cache.md); if not given, "
                   "$XDG_CACHE_HOME/adp-pass or ~/.cache/adp-pass")
    p.add_argument("--no-cache", action="store_true", help="build every rank's graph; no cache")
    p.add_argument("--api-key", metavar="KEY", type=_api_key, action="append", default=None,
                   help="clients must send 'Authorization: Bearer KEY' on /v1/* and /metrics "
                   "(repeatable: several keys; also $ADP_API_KEY, comma-separated); if not "
                   "given, no key is needed (docs/serving.md, Security)")
    p.add_argument("--metrics-public", action="store_true",
                   help="with --api-key: serve /metrics without a key (to a scraper)")
    p.add_argument("--allowed-origins", metavar="ORIGINS", type=_origins, default=None,
                   help="web pages (https://app.example,...; * for any) whose scripts may call "
                   "the API from a browser (CORS); if not given, none")
    p.add_argument("--ssl-keyfile", metavar="FILE", type=Path, default=None,
                   help="serve HTTPS with this private key (PEM), with --ssl-certfile")
    p.add_argument("--ssl-certfile", metavar="FILE", type=Path, default=None,
                   help="serve HTTPS with this certificate chain (PEM), with --ssl-keyfile")
    p.add_argument("--read-timeout", metavar="S", type=_float_in(0, low_open=True), default=30.0,
                   help="seconds a client may take to send a request's headers, and again its "
                   "body, before it gets 408")
    p.add_argument("--keep-alive-timeout", metavar="S", type=_float_in(0, low_open=True),
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
    p.add_argument("--rate", metavar="R", type=_float_in(0, low_open=True), default=math.inf,
                   help="requests per second (Poisson); inf: all at once")
    p.add_argument("--num-prompts", metavar="N", type=_positive, default=100, help="requests")
    p.add_argument("--input-len", metavar="N", type=_positive, default=None,
                   help="prompt tokens per request; if not given, 512, or 3/4 of the server's "
                   "max_model_len when 512 + --output-len does not fit it")
    p.add_argument("--output-len", metavar="N", type=_positive, default=None,
                   help="tokens generated per request; if not given, 128, or the rest of the "
                   "server's max_model_len after --input-len")
    p.add_argument("--max-concurrency", metavar="N", type=_positive, default=None,
                   help="requests in flight at most; if not given, no limit")
    p.add_argument("--seed", metavar="N", type=_int_at_least(0), default=0,
                   help="prompts and arrival times")
    p.add_argument("--timeout", metavar="S", type=_float_in(0, low_open=True), default=600.0,
                   help="seconds one request may take")
    p.add_argument("--out", metavar="FILE", type=Path, default=None,
                   help="also write the results (and every request's figures) as JSON")
    p.add_argument("--force", action="store_true",
                   help="let --out replace an existing file that is not a bench-serve report")


# ----------------------------------------------------------------------------- progress
class _Stages:
    """Each stage's start and time, on stderr (stdout keeps the results)."""

    def __init__(self, command: str) -> None:
        self.command = command

    @contextmanager
    def __call__(self, what: str):
        print(f"adp {self.command}: {what} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        print(f"adp {self.command}: {what}: done in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared checks
def _mapping(spec: str, flag: str = "--mapping") -> Mapping:
    try:
        return Mapping.load(spec)
    except MappingError as err:
        err.flag = err.flag or flag
        raise


def _check_tp_fits_model(mapping: Mapping, heads: int, kv_heads: int, inter: int,
                         flag: str) -> None:
    try:
        mapping.check_model(heads, kv_heads, inter)
    except MappingError as err:
        if flag == "--world-size":  # the user typed a world size, not a tp: say how they relate
            raise UsageError(f"--world-size {mapping.tp_size} is the TP degree: {err}",
                             flag=flag, hint="pick a --world-size that divides the model's heads "
                             "and intermediate size") from None
        err.flag = flag
        raise


def _ranks_device(args: argparse.Namespace) -> str:
    """--device (else ADP_DEVICE, else auto) resolved to "cpu" or "cuda"; exported, so that the
    ranks, which read it from their environment, run where it says."""
    from adp_pass.launch import DEVICE_ENV, job_device

    if getattr(args, "device", None):
        os.environ[DEVICE_ENV] = args.device
    try:
        return job_device()
    except (RuntimeError, ValueError) as err:
        raise UsageError(str(err), flag="--device", hint="use --device cpu (gloo ranks), or auto")


def _check_ranks_fit_machine(world_size: int, device: str) -> None:
    """One rank per GPU. gloo ranks on the CPU share the cores when there are more ranks than
    cores (slower, but right: how a tp=8 mapping is verified on a laptop): a warning, and one
    thread per rank (OMP_NUM_THREADS, which the ranks inherit) so they do not fight over them."""
    import torch

    if device == "cuda":
        limit = torch.cuda.device_count()
        if world_size > limit:
            raise UsageError(f"--world-size {world_size} is more ranks than this machine can "
                             f"run: it has {limit} GPUs", flag="--world-size",
                             hint=f"use --world-size {limit} or less, or --device cpu (gloo "
                             "ranks on the CPU)")
        return
    cores = os.cpu_count() or 1
    if world_size > cores:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        print(f"adp: warning: --world-size {world_size} gloo ranks share {cores} CPU core"
              f"{'s' * (cores != 1)}, {os.environ['OMP_NUM_THREADS']} thread(s) each: slower, "
              "with the same results", file=sys.stderr, flush=True)


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="where the ranks run: auto (one GPU each when there are GPUs, else the "
                   "CPU with gloo), cpu or cuda; if not given, $ADP_DEVICE or auto")


# ----------------------------------------------------------------------------- commands
def cmd_verify(args: argparse.Namespace, stage: _Stages) -> int:
    shape = PRESETS[args.preset]
    if args.mapping is None:
        mapping = _mapping(f"tp={args.world_size},attn_dp=1", "--world-size")
    else:
        mapping = _mapping(args.mapping)
        if mapping.tp_size != args.world_size:
            raise UsageError(f"--mapping {args.mapping!r} has tp={mapping.tp_size} but "
                             f"--world-size is {args.world_size}: the mapping regroups the ranks "
                             "of the TP job", flag="--mapping",
                             hint=f"use --world-size {mapping.tp_size}, or tp={args.world_size}")
    flag = "--world-size" if args.mapping is None else "--mapping"
    _check_tp_fits_model(mapping, shape.num_attention_heads, shape.num_key_value_heads,
                         shape.intermediate_size, flag)
    if args.seq > shape.max_position_embeddings:
        raise UsageError(f"--seq {args.seq} is longer than preset {args.preset}'s "
                         f"{shape.max_position_embeddings} positions", flag="--seq")
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
    _check_ranks_fit_machine(args.world_size, _ranks_device(args))

    from adp_pass.presets import qwen3_config
    from adp_pass.launch import default_log_path
    from adp_pass.verify import verify

    log_dir = log_dir or default_log_path("verify", suffix="")
    print(f"verify: preset {args.preset}, {args.world_size} ranks, mapping {mapping}, batch "
          f"{args.batch}x{args.seq}")
    with stage(f"parity on {args.world_size} ranks (rank logs: {log_dir})"):
        report = verify(qwen3_config(args.preset), args.world_size, batch=args.batch,
                        seq=args.seq, splits=args.splits, seed=args.seed, lower_ops=args.lower,
                        log_dir=log_dir, self_check=not args.no_self_check, mapping=mapping,
                        dump_dir=args.dump_dir)
    print(report.plan_text)
    print()
    print(report)
    diffs = [report.tp_max_abs_diff, report.adp_max_abs_diff]
    if report.lowered_vs_rewritten_max_abs_diff is not None:
        diffs.append(report.lowered_vs_rewritten_max_abs_diff)
    # The replicated mapping keeps no collective; every other mapping keeps or inserts some.
    ok = max(diffs) <= args.tolerance and (report.collectives_left == 0 or mapping.lockstep_size > 1)
    print(f"{'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g}, {report.seconds:.1f} s)")
    print(f"rank logs: {log_dir}", file=sys.stderr)
    return 0 if ok else 1


def cmd_rewrite(args: argparse.Namespace, stage: _Stages) -> int:
    shape = PRESETS[args.preset]
    mapping = _mapping(args.mapping)
    _check_tp_fits_model(mapping, shape.num_attention_heads, shape.num_key_value_heads,
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
        from adp_pass.report import summarize_graph, weight_bytes, write_rewrite_outputs
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
          f"parameters regrouped: weights per rank {_mb(tp_bytes)} -> {_mb(adp_bytes)}")
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
                            stage: _Stages, pipeline) -> None:
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


def _model_and_mapping(args: argparse.Namespace) -> tuple[str, int, int, Mapping]:
    """``adp run`` / ``adp serve``: the model (``--preset`` or ``--checkpoint``) and the mapping
    (``--mapping``, else replicated over ``--world-size``), checked against each other: the
    preset name, vocabulary size, positions and mapping."""
    if args.checkpoint is not None and args.preset is not None:
        raise UsageError("give --preset or --checkpoint, not both", flag="--checkpoint",
                         hint="a checkpoint brings its own shape (config.json)")
    preset = args.preset or "tiny"
    if args.checkpoint is not None:
        config = check_checkpoint(args.checkpoint)
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        inter, vocab = config["intermediate_size"], config["vocab_size"]
        max_position = config.get("max_position_embeddings") or 4096
    else:
        shape = PRESETS[preset]
        heads, kv_heads, inter = (shape.num_attention_heads, shape.num_key_value_heads,
                                  shape.intermediate_size)
        vocab, max_position = shape.vocab_size, shape.max_position_embeddings
    if args.mapping is not None:
        mapping = _mapping(args.mapping)
        if args.world_size is not None and args.world_size != mapping.world_size:
            raise UsageError(f"--world-size {args.world_size} is not the --mapping's tp "
                             f"({mapping.tp_size}): the mapping regroups the ranks of one TP job",
                             flag="--world-size", hint="drop --world-size, or make them equal")
        _check_tp_fits_model(mapping, heads, kv_heads, inter, "--mapping")
    else:
        mapping = _mapping(f"tp={args.world_size or 2},attn_dp=1", "--world-size")
        _check_tp_fits_model(mapping, heads, kv_heads, inter, "--world-size")
    return preset, vocab, max_position, mapping


def cmd_run(args: argparse.Namespace, stage: _Stages) -> int:
    preset, vocab, max_position, mapping = _model_and_mapping(args)
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
    if args.log_dir is not None:
        check_out_dir(args.log_dir, "--log-dir")
    if args.no_cache and args.cache_dir is not None:
        raise UsageError("give --cache-dir or --no-cache, not both", flag="--no-cache")
    if args.cache_dir is not None:
        check_out_dir(args.cache_dir, "--cache-dir")
    if args.dump_dir is not None:
        check_out_dir(args.dump_dir, "--dump-dir")
    _check_ranks_fit_machine(world_size, _ranks_device(args))

    from adp_pass.runtime.build_cache import default_cache_dir
    from adp_pass.runtime.contract import Request, SamplingParams
    from adp_pass.runtime.frontend import (
        assign_by_load, default_log_path, make_job, run_job, synthetic_requests)
    from adp_pass.runtime.serving_config import ServingConfig

    cache_dir = None if args.no_cache else str(args.cache_dir or default_cache_dir())
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
        cuda_graph_sizes=tuple(args.cuda_graphs or ()))
    job = make_job(
        mapping, assign_by_load(requests, mapping.dp_size), preset=preset,
        checkpoint=str(args.checkpoint) if args.checkpoint else None, dtype=args.dtype,
        serving=serving, cache_dir=cache_dir,
        dump_dir=str(args.dump_dir) if args.dump_dir is not None else None,
    )
    log = (args.log_dir / Path(default_log_path()).name) if args.log_dir else default_log_path()
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


def cmd_serve(args: argparse.Namespace, stage: _Stages) -> int:
    preset, vocab, positions, mapping = _model_and_mapping(args)
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
    node = _node_spec(args)
    api_keys = _serve_security(args, http=node is None or node.node_rank == 0)
    if args.log_dir is not None:
        check_out_dir(args.log_dir, "--log-dir")
    if args.no_cache and args.cache_dir is not None:
        raise UsageError("give --cache-dir or --no-cache, not both", flag="--no-cache")
    if args.cache_dir is not None:
        check_out_dir(args.cache_dir, "--cache-dir")
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
    _check_ranks_fit_machine(mapping.world_size // (args.nnodes if node else 1),
                             _ranks_device(args))

    from adp_pass.runtime.build_cache import default_cache_dir
    from adp_pass.launch import default_log_path
    from adp_pass.serving.guard import HTTPLimits
    from adp_pass.serving.server import ServeOptions, serve

    log = (args.log_dir / Path(default_log_path("serve")).name if args.log_dir
           else default_log_path("serve"))
    what = (f"node {node.node_rank}: {mapping.world_size // args.nnodes} ranks joining the front "
            f"end at {node.front_end}" if node and node.node_rank else
            f"serve on {mapping.world_size} ranks, http://{args.host}:{args.port}")
    options = ServeOptions(
        mapping=mapping, model_name=args.served_model_name or (
            str(args.checkpoint) if args.checkpoint else preset),
        vocab_size=vocab, max_model_len=max_model_len, preset=preset,
        checkpoint=str(args.checkpoint) if args.checkpoint else None, host=args.host,
        port=args.port, dtype=args.dtype, num_blocks=args.num_blocks, block_size=BLOCK_SIZE,
        max_batch=args.max_batch, max_queue=args.max_queue,
        cuda_graph_sizes=tuple(args.cuda_graphs), seed=args.seed,
        cache_dir=None if args.no_cache else str(args.cache_dir or default_cache_dir()),
        log_path=log, start_timeout_s=args.start_timeout,
        shutdown_timeout_s=args.shutdown_timeout, rank_timeout_s=args.rank_timeout,
        nnodes=args.nnodes, node=node, api_keys=api_keys, metrics_public=args.metrics_public,
        allowed_origins=tuple(args.allowed_origins or ()),
        ssl_keyfile=str(args.ssl_keyfile) if args.ssl_keyfile else None,
        ssl_certfile=str(args.ssl_certfile) if args.ssl_certfile else None,
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
                keys.append(_api_key(key.strip()))
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


def cmd_bench_serve(args: argparse.Namespace, stage: _Stages) -> int:
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


def cmd_plan(args: argparse.Namespace, stage: _Stages) -> int:
    from adp_pass.plan_cli import run_plan  # the plan command lives beside the cost model

    return run_plan(args)


def cmd_calibrate(args: argparse.Namespace, stage: _Stages) -> int:
    out = args.out
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name", flag="--out",
                         hint=f"e.g. --out {out / 'calibration.json'}")
    check_out_dir(out.parent if str(out.parent) else Path("."), "--out")
    check_out_file(out, "--out", force=args.force, marks=CALIBRATION_KEYS)
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        gpus = args.gpus or count
        if gpus > count:
            raise UsageError(f"--gpus {gpus} is more than the {count} GPUs of this machine",
                             flag="--gpus", hint=f"use --gpus {count} or less")
    else:
        cores = os.cpu_count() or 1
        gpus = args.gpus or min(2, cores)
        if gpus > cores:
            raise UsageError(f"--gpus {gpus} is more gloo ranks than this machine can run: it has "
                             f"no GPU and {cores} CPU cores", flag="--gpus",
                             hint=f"use --gpus {cores} or less")
    from adp_pass.calibrate import calibrate, write_calibration

    with stage(f"measure on {gpus} {'GPU' if torch.cuda.is_available() else 'CPU rank'}"
               f"{'s' * (gpus != 1)}"):
        data = calibrate(gpus, timeout_s=args.timeout)
    write_calibration(data, out)
    gemm = ", ".join(f"{t} tokens {r:g}" for t, r in data["gemm_tflops"].items())
    print(f"calibrate: wrote {out} ({data['gpu']}, {gpus} rank{'s' * (gpus != 1)}, "
          f"{data['seconds']:g} s)")
    print(f"  copy {data['copy_bandwidth_gbps']:g} GB/s; GEMM (TFLOP/s) {gemm}; attention "
          f"{data['attention_bandwidth_gbps']:g} GB/s ({data['attention_kernel']}); small "
          f"kernel {data['kernel_launch_us']:g} us")
    for op, words in (("allreduce", "all-reduce"), ("allgather", "all-gather"),
                      ("reducescatter", "reduce-scatter")):
        cells = [f"{g}: {e['latency_us']:g} us + {e['bus_bandwidth_gbps']:g} GB/s"
                 for g, e in data[op].items()]
        if cells:
            print(f"  {words:<15}" + "; ".join(cells))
    if data.get("gemm_tflops_fp8"):
        print("  GEMM fp8 (TFLOP/s) " + ", ".join(f"{t} tokens {r:g}"
                                               for t, r in data["gemm_tflops_fp8"].items()))
    if data.get("gemm_shapes"):
        print(f"  GEMM on {len(data['gemm_shapes'].get('bf16', {}))} TP shard shapes "
              f"({', '.join(data['gemm_shapes'])})")
    if data.get("lockstep_agree_us"):
        print("  lockstep agreement (gloo) " + "; ".join(
            f"{g}: {us:g} us" for g, us in data["lockstep_agree_us"].items()))
    print(f"  use it: adp plan --gpu {out} --gpus {gpus} ... (laid over its GPU's profile)")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- the error path
# Errors of modules another change owns (no AdpError base there): caught by class, by stage.
def explain(err: BaseException) -> tuple[int, str, str | None]:
    """(exit code, message, fix) for any error that reaches the command line."""
    if isinstance(err, AdpError):
        message, hint = str(err), err.hint
        if err.flag and err.flag not in message and not isinstance(err, MappingError):
            message = f"{err.flag}: {message}"
        elif isinstance(err, MappingError):
            message = f"bad {err.flag or 'mapping'}: {message}"
        return err.exit_code, message, hint
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted", None
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return 1, f"out of memory: {err}".rstrip(": "), ("use a smaller --preset, --num-blocks "
                                                         "or --world-size")
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return 1, f"{err.strerror or err}{where}", None
    return 1, f"unexpected {type(err).__name__}: {err}", (
        "this is a bug in adp-pass: rerun with --debug and report the traceback")


def _report(err: BaseException, command: str | None, debug: bool) -> int:
    code, message, hint = explain(err)
    lines = [line for line in message.strip().splitlines() if line.strip()] or [message]
    if len(lines) > MAX_MESSAGE_LINES:
        lines = lines[: MAX_MESSAGE_LINES - 1] + [f"... ({len(lines) - MAX_MESSAGE_LINES + 1} "
                                                  "more lines; --debug shows them)"]
    out = [f"adp{' ' + command if command else ''}: error: {lines[0]}", *lines[1:]]
    if hint:
        out.append(f"  fix: {hint}")
    if getattr(err, "log", None):
        out.append(f"  rank logs: {err.log}")
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    print("\n".join(out), file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the adp command itself, not a call from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    commands = {"verify": cmd_verify, "rewrite": cmd_rewrite, "run": cmd_run, "plan": cmd_plan,
                "calibrate": cmd_calibrate, "serve": cmd_serve, "bench-serve": cmd_bench_serve,
                "quantize": cmd_quantize}
    command = next((a for a in argv if a in commands), None)  # for the error prefix only
    try:
        args = parser.parse_args(argv)
        code = commands[args.command](args, _Stages(args.command))
    except SystemExit:  # --help
        raise
    except BaseException as err:  # noqa: BLE001 - the one place errors become messages
        if command and isinstance(err, UsageError) and err.hint == "see 'adp --help'":
            err.hint = f"see 'adp {command} --help'"  # argparse reports leftovers at the top
        code = _report(err, command, "--debug" in argv)
    if as_program:
        exit_without_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
