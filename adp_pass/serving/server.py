"""``adp serve``: start the ranks once, then serve the OpenAI API over them with uvicorn until
SIGTERM / Ctrl-C (graceful) or a fatal rank failure (exit code 1: no group left to serve or
restart). A group whose rank dies is restarted meanwhile (``ranks.RankSet``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adp_pass.mapping import Mapping
from adp_pass.serving.guard import HTTPLimits
from adp_pass.serving.ranks import NodeSpec


@dataclass
class ServeOptions:
    mapping: Mapping
    model_name: str
    vocab_size: int
    max_model_len: int
    preset: str = "tiny"
    checkpoint: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    kv_cache_dtype: str = "auto"  # ServingConfig.kv_cache_dtype / kv_cache_scale
    kv_cache_scale: float = 1.0
    num_blocks: int = 256
    block_size: int = 16
    max_batch: int = 64
    max_queue: int = 256
    cuda_graph_sizes: tuple[int, ...] = ()
    seed: int = 0
    cache_dir: str | None = None
    log_path: Path | None = None
    start_timeout_s: float = 1800.0
    shutdown_timeout_s: float = 30.0
    rank_timeout_s: float | None = 600.0
    # A group whose rank died is restarted (ranks.RestartPolicy): starts tried per failure (0:
    # never), the first after restart_backoff_s, doubling up to restart_backoff_max_s.
    restart_attempts: int = 3
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    nnodes: int = 1
    node: NodeSpec | None = None  # one machine of several (--node-rank); None: all here
    api_keys: tuple[str, ...] = ()  # empty: no key needed
    metrics_public: bool = False
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: off
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    limits: HTTPLimits = HTTPLimits()


def asgi_app(state, o: ServeOptions):
    """The routes behind the limits (outermost: nothing is read past them), CORS (before the
    keys, so that a browser's preflight, which carries no key, is answered) and the keys."""
    from adp_pass.serving.app import build_app
    from adp_pass.serving.guard import Cors, Guard, KeyCheck

    app = build_app(state)
    if o.api_keys:
        app = KeyCheck(app, o.api_keys, metrics_public=o.metrics_public)
    if o.allowed_origins:
        app = Cors(app, o.allowed_origins)
    return Guard(app, o.limits)


def http_config(app, o: ServeOptions):
    """uvicorn's configuration: the guarded h11 protocol (whatever HTTP parser is installed, so
    the limits are the same everywhere), timeouts, TLS."""
    import uvicorn

    from adp_pass.serving.guard import protocol_class

    return uvicorn.Config(app, host=o.host, port=o.port, log_level="warning", access_log=False,
                          lifespan="off", timeout_graceful_shutdown=5,
                          timeout_keep_alive=o.limits.keep_alive_timeout_s,
                          http=protocol_class(o.limits), ws="none",
                          h11_max_incomplete_event_size=o.limits.max_head_bytes,
                          ssl_keyfile=o.ssl_keyfile, ssl_certfile=o.ssl_certfile,
                          server_header=False)


def _http_server(config):
    """uvicorn's server without its own signal handling: SIGTERM drains the requests first
    (``ServingState.drain``), and the process decides its exit code itself (uvicorn re-raises
    the signal it caught, which would end the process before the ranks are stopped)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(config)


def serve(options: ServeOptions) -> int:
    if options.node is not None and options.node.node_rank > 0:
        return _serve_node(options)
    return asyncio.run(_serve(options))


def _write_job(o: ServeOptions) -> Path:
    from adp_pass.runtime.contract import Job
    from adp_pass.runtime.serving_config import ServingConfig

    job_dir = Path(tempfile.mkdtemp(prefix="adp-serve-"))
    serving = ServingConfig(block_size=o.block_size, num_blocks=o.num_blocks,
                            max_position=o.max_model_len, max_seq_len=o.max_model_len,
                            max_batch=o.max_batch, cuda_graph_sizes=tuple(o.cuda_graph_sizes),
                            kv_cache_dtype=o.kv_cache_dtype, kv_cache_scale=o.kv_cache_scale)
    Job(mapping=o.mapping, preset=o.preset, checkpoint=o.checkpoint, dtype=o.dtype,
        serving=serving, seed=o.seed, cache_dir=o.cache_dir).write(job_dir / "job.json")
    return job_dir


def _serve_node(o: ServeOptions) -> int:
    """A machine other than node 0: start its torchrun agent, whose ranks join the rendezvous
    and connect to node 0's front end; return when they stop (node 0 says so, or fails)."""
    import os
    import subprocess

    from adp_pass.serving.ranks import agent_command, run_id_for

    node = o.node
    job_dir = _write_job(o)
    env = dict(os.environ, ADP_SERVE_ADDR=node.front_end, ADP_SERVE_TOKEN=node.token,
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("ADP_SERVE_RANK", None)
    command = agent_command(job_dir, o.mapping.world_size, o.nnodes, node.rdzv_endpoint,
                            run_id_for(node.token))
    print(f"adp serve: node {node.node_rank}: starting {o.mapping.world_size // o.nnodes} ranks "
          f"(rendezvous {node.rdzv_endpoint}, front end {node.front_end})", file=sys.stderr,
          flush=True)
    agent = subprocess.Popen(command, env=env, start_new_session=True)

    def forward(sig, frame):  # the agent stops its ranks; they tell the front end
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = agent.wait()
    print(f"adp serve: node {node.node_rank}: ranks stopped (code {code})", file=sys.stderr,
          flush=True)
    return 0 if code == 0 else 1


async def _serve(o: ServeOptions) -> int:
    from adp_pass.launch import default_log_path
    from adp_pass.serving.protocol import ModelLimits
    from adp_pass.serving.ranks import RankSet, RestartPolicy
    from adp_pass.serving.state import ServingState
    from adp_pass.tokenizer import load_tokenizer

    job_dir = _write_job(o)
    log_path = o.log_path or default_log_path("serve")
    ranks = RankSet(o.mapping, job_dir, log_path, nnodes=o.nnodes, node=o.node,
                    silence_timeout_s=o.rank_timeout_s, start_timeout_s=o.start_timeout_s,
                    restart=RestartPolicy(o.restart_attempts, o.restart_backoff_s,
                                          o.restart_backoff_max_s))
    tokenizer = load_tokenizer(o.checkpoint)
    limits = ModelLimits(o.model_name, o.vocab_size, o.max_model_len, o.num_blocks * o.block_size)
    state = ServingState(ranks, limits, tokenizer, max_queue=o.max_queue,
                         shutdown_timeout_s=o.shutdown_timeout_s)
    loop = asyncio.get_running_loop()
    print(f"adp serve: starting {o.mapping.world_size} ranks (mapping {o.mapping}; rank log "
          f"{log_path})", file=sys.stderr, flush=True)
    stop_signals = asyncio.Event()

    def on_stop_signal():
        if stop_signals.is_set():  # the second one: stop waiting for the requests in flight
            state.forced = True
        stop_signals.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    await ranks.start()
    try:
        ready = asyncio.ensure_future(ranks.wait_ready(o.start_timeout_s))
        signalled = asyncio.ensure_future(stop_signals.wait())
        await asyncio.wait({ready, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            print("adp serve: interrupted while the ranks started", file=sys.stderr)
            await ranks.stop(timeout_s=5)
            return 130
        ready.result()  # a rank's start failure raises its own error (RankFailed)
    except BaseException:
        ranks.kill()
        raise
    server = _http_server(http_config(asgi_app(state, o), o))
    http = asyncio.ensure_future(server.serve())
    while not server.started and not http.done():
        await asyncio.sleep(0.05)
    if http.done():  # could not bind the port (uvicorn logged why)
        await ranks.stop(timeout_s=10)
        exc = http.exception() if not http.cancelled() else None
        raise OSError(f"the HTTP server on {o.host}:{o.port} did not start"
                      f"{f' ({exc})' if exc else ''}; is the port in use?")
    scheme = "https" if o.ssl_certfile else "http"
    keys = (f"API key required ({len(o.api_keys)} key{'s' * (len(o.api_keys) != 1)})"
            if o.api_keys else "no API key")  # the keys themselves are never printed
    print(f"adp serve: ready on {scheme}://{o.host}:{o.port}/v1 (model '{o.model_name}', "
          f"{o.mapping.world_size} ranks, {o.mapping.dp_size} DP group"
          f"{'s' * (o.mapping.dp_size != 1)}; {keys})", flush=True)

    async def on_signal():
        await stop_signals.wait()
        print("adp serve: shutting down: finishing the requests in flight", file=sys.stderr,
              flush=True)
        await state.drain()

    draining = asyncio.ensure_future(on_signal())
    done = asyncio.ensure_future(state.stop_event.wait())
    await asyncio.wait({done, http}, return_when=asyncio.FIRST_COMPLETED)
    draining.cancel()
    server.should_exit = True
    with contextlib.suppress(asyncio.TimeoutError, Exception):
        await asyncio.wait_for(http, 15)
    await ranks.stop(timeout_s=5 if state.failed else 30)
    if state.failed:
        print(f"adp serve: error: {state.failed}", file=sys.stderr, flush=True)
        print(f"  rank logs: {log_path}", file=sys.stderr, flush=True)
    else:
        print("adp serve: stopped", file=sys.stderr, flush=True)
    return state.exit_code
