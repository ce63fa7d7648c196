"""Load test of ``adp serve``: many clients at once, every request answered or refused with 429,
none lost, none hung.

By default it starts its own server (preset tiny, gloo ranks on the CPU, a small queue so that
429s happen) and sends ``--requests`` requests from ``--clients`` concurrent clients, each
client one request after another (after a 429, waiting its Retry-After): a mix of completions
and chat, streamed and whole, n of 1 or 2, a few tokens each. Every request ends as one of

* ``ok``: 200 with the tokens asked for (a stream: chunks, a finish reason and ``[DONE]``),
* ``busy``: 429 with ``Retry-After`` and the OpenAI error body (the queues were full),
* ``lost``: anything else (another status, a cut stream, a connection error),
* ``hung``: no answer within ``--request-timeout``.

After the load, the server must be back to idle: /health 200, nothing in flight, every KV block
free. The run fails (exit 1) on any lost or hung request or a server that does not settle::

    python bench/load_serve.py                                # 500 requests, 64 clients
    python bench/load_serve.py --url http://127.0.0.1:8000    # against a running server
    python bench/load_serve.py --out bench/results/load-serve-cpu.json

``--url`` takes a server started elsewhere (its key from ``ADP_API_KEY``); for a meaningful
mix it should queue few requests (``adp serve --max-queue 16``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, key: str) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = Path(args.log or f"/tmp/adp-load-serve-{port}.log")
    command = [sys.executable, "-m", "adp_pass.cli", "serve", "--preset", "tiny",
               "--world-size", str(args.world_size), "--port", str(port), "--max-queue",
               str(args.max_queue), "--num-blocks", str(args.num_blocks), "--api-key", key]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True, env=dict(os.environ, ADP_DEVICE="cpu"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"adp serve exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    sys.exit(f"adp serve not ready in {args.start_timeout:g} s; see {log}")


def _request(rng: random.Random, model: str) -> tuple[str, dict, int]:
    """(path, body, tokens expected per choice): a random small request of the mix."""
    tokens = rng.randint(1, 4)
    n = rng.choice([1, 1, 1, 2])
    stream = rng.random() < 0.5
    common = {"model": model, "max_tokens": tokens, "n": n, "stream": stream,
              "ignore_eos": True, "temperature": rng.choice([0, 0.8]), "seed": rng.randrange(99)}
    if rng.random() < 0.5:
        prompt = ([rng.randrange(256) for _ in range(rng.randint(1, 24))] if rng.random() < 0.5
                  else "load " * rng.randint(1, 6))
        return "/v1/completions", {**common, "prompt": prompt}, tokens
    return "/v1/chat/completions", {**common, "messages": [
        {"role": "user", "content": "hello " * rng.randint(1, 6)}]}, tokens


async def _one(client: httpx.AsyncClient, path: str, body: dict, tokens: int,
               timeout_s: float) -> dict:
    start = time.perf_counter()
    try:
        return await asyncio.wait_for(_send(client, path, body, tokens, start), timeout_s)
    except asyncio.TimeoutError:
        return {"outcome": "hung", "why": f"no answer in {timeout_s:g} s", "s": timeout_s}
    except httpx.HTTPError as err:
        return {"outcome": "lost", "why": f"{type(err).__name__}: {err}",
                "s": time.perf_counter() - start}


async def _send(client, path, body, tokens, start) -> dict:
    def end(outcome, why=""):
        return {"outcome": outcome, "why": why, "s": time.perf_counter() - start}

    async with client.stream("POST", path, json=body) as response:
        data = await response.aread() if not body["stream"] or response.status_code != 200 \
            else None
        if response.status_code == 429:
            error = json.loads(data).get("error", {})
            ok = response.headers.get("retry-after") and set(error) == {
                "message", "type", "param", "code"}
            if not ok:
                return end("lost", f"429 without Retry-After/error: {data!r}")
            return dict(end("busy"), retry_after=float(response.headers["retry-after"]))
        if response.status_code != 200:
            return end("lost", f"HTTP {response.status_code}: {(data or b'')[:200]!r}")
        if not body["stream"]:
            choices = json.loads(data)["choices"]
            got = json.loads(data)["usage"]["completion_tokens"]
            if len(choices) != body["n"] or got != tokens * body["n"]:
                return end("lost", f"{len(choices)} choices, {got} tokens for n={body['n']} x "
                           f"{tokens}")
            return end("ok")
        finished, done = set(), False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return end("lost", f"stream error: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                if choice.get("finish_reason"):
                    finished.add(choice["index"])
        if not done or len(finished) != body["n"]:
            return end("lost", f"stream cut: [DONE] {done}, {len(finished)} of {body['n']} "
                       "choices finished")
        return end("ok")


async def run_load(url: str, key: str | None, requests: int, clients: int, timeout_s: float,
                   seed: int) -> list[dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout_s, connect=10)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        # One request first: the ranks' first steps compile their kernels.
        await client.post("/v1/completions", json={"model": model, "prompt": "warm",
                                                   "max_tokens": 2})
        rng = random.Random(seed)
        plan = [_request(rng, model) for _ in range(requests)]
        results: list[dict] = []

        async def worker(i: int) -> None:
            backoff = random.Random(seed + i)
            while plan:
                path, body, tokens = plan.pop()
                result = await _one(client, path, body, tokens, timeout_s)
                results.append(result)
                if result["outcome"] == "busy":  # as a client should: wait Retry-After
                    await asyncio.sleep(result["retry_after"] * (0.5 + backoff.random()))

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return results


def settled(url: str, key: str | None, timeout_s: float = 60.0) -> tuple[bool, str]:
    """The server back to idle: /health 200, nothing in flight, no KV block in use."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout_s
    what = ""
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health", headers=headers, timeout=10)
        metrics = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
        values = {}
        for line in metrics.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in ("adp_requests_in_flight", "adp_kv_blocks_used"):
                values[name] = values.get(name, 0) + float(line.rsplit(" ", 1)[1])
        what = f"/health {health.status_code}, {values}"
        if health.status_code == 200 and not any(values.values()):
            return True, what
        time.sleep(0.5)
    return False, what


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default=None, help="a running server; if not given, start one")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds after which a request counts as hung")
    p.add_argument("--world-size", type=int, default=2, help="ranks of the server it starts")
    p.add_argument("--max-queue", type=int, default=16, help="of the server it starts")
    p.add_argument("--num-blocks", type=int, default=64, help="of the server it starts")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="the started server's log file")
    p.add_argument("--out", type=Path, default=None, help="write the summary as JSON")
    args = p.parse_args()

    process = None
    if args.url:
        url, key = args.url.rstrip("/").removesuffix("/v1"), os.environ.get("ADP_API_KEY")
    else:
        key = os.environ.get("ADP_API_KEY") or "load-test-key"
        process, url, log = start_server(args, key)
        print(f"load_serve: server {url} (log {log})", flush=True)
    try:
        start = time.perf_counter()
        results = asyncio.run(run_load(url, key, args.requests, args.clients,
                                       args.request_timeout, args.seed))
        duration = time.perf_counter() - start
        idle, state = settled(url, key)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("ok", "busy", "lost", "hung")}
    ok_s = sorted(r["s"] for r in results if r["outcome"] == "ok")
    summary = {
        "url": url, "requests": args.requests, "clients": args.clients, "seconds": duration,
        **counts, "answered": len(results),
        "ok_latency_p50_s": statistics.median(ok_s) if ok_s else None,
        "ok_latency_max_s": ok_s[-1] if ok_s else None,
        "settled": idle, "after": state,
        "problems": sorted({r["why"] for r in results if r["outcome"] in ("lost", "hung")})[:10],
    }
    print(f"load_serve: {args.requests} requests from {args.clients} clients in {duration:.1f} s:"
          f" {counts['ok']} ok, {counts['busy']} busy (429), {counts['lost']} lost, "
          f"{counts['hung']} hung; ok latency p50 {summary['ok_latency_p50_s'] or 0:.2f} s, "
          f"max {summary['ok_latency_max_s'] or 0:.2f} s; after: {state}")
    for problem in summary["problems"]:
        print(f"  problem: {problem}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    good = (counts["lost"] == counts["hung"] == 0 and len(results) == args.requests and idle)
    print("PASS" if good else "FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
