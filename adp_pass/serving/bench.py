"""``adp bench-serve``: load an OpenAI-compatible server with Poisson arrivals over HTTP and
report what ``vllm bench serve`` reports: request and token throughput, TTFT, TPOT, ITL and
end-to-end latency (mean, p50, p99).

Each request is a streaming ``/v1/completions`` of ``input_len`` random token ids (seeded) that
generates exactly ``output_len`` tokens (``ignore_eos``, greedy). TTFT: from sending to the first
chunk with text; ITL: the gaps between chunks; TPOT per request: (latency - TTFT) / (tokens - 1);
token counts from the server's usage report.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from pathlib import Path

from adp_pass.errors import AdpError


class BenchError(AdpError):
    """The server could not be benchmarked (unreachable, or not an OpenAI server)."""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _summary(values: list[float]) -> dict:
    ms = [1e3 * v for v in values]
    return {"mean_ms": statistics.fmean(ms) if ms else float("nan"),
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}


async def _one(client, model: str, prompt: list[int], output_len: int, timeout_s: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunks: list[float] = []
    usage, error = None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body,
                                 timeout=timeout_s) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        error = data["error"].get("message", str(data["error"]))
                        break
                    if data.get("usage"):
                        usage = data["usage"]
                    if any(c.get("text") for c in data.get("choices", [])):
                        chunks.append(time.perf_counter())
    except Exception as err:  # noqa: BLE001 - a failed request is counted, not fatal
        error = f"{type(err).__name__}: {err}"
    end = time.perf_counter()
    if error is None and not chunks:
        error = "no text came back"
    return {"ok": error is None, "error": error, "start": start, "latency_s": end - start,
            "ttft_s": chunks[0] - start if chunks else None,
            "itl_s": [b - a for a, b in zip(chunks, chunks[1:])],
            "prompt_tokens": (usage or {}).get("prompt_tokens", len(prompt)),
            "output_tokens": (usage or {}).get("completion_tokens", len(chunks))}


async def _bench(url: str, model: str | None, rate: float, num_prompts: int, input_len: int,
                 output_len: int, max_concurrency: int | None, seed: int,
                 timeout_s: float) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s, connect=10),
                                 limits=httpx.Limits(max_connections=None,
                                                     max_keepalive_connections=None)) as client:
        try:
            response = await client.get("/v1/models", timeout=10)
            cards = response.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
            raise BenchError(f"--url {url}: no OpenAI model list at /v1/models ({err})",
                             flag="--url", hint="start the server first (adp serve ...) and "
                             "give its address") from None
        card = next((c for c in cards if model in (None, c["id"])), None)
        if card is None:
            raise BenchError(f"--model {model}: the server serves {[c['id'] for c in cards]}",
                             flag="--model", hint="drop --model, or give one of those")
        vocab = card.get("vocab_size") or 1000
        rng = random.Random(seed)
        prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_prompts)]
        gaps = [0.0 if math.isinf(rate) else rng.expovariate(rate) for _ in range(num_prompts)]
        gate = asyncio.Semaphore(max_concurrency or num_prompts)

        async def limited(prompt):
            async with gate:
                return await _one(client, card["id"], prompt, output_len, timeout_s)

        start = time.perf_counter()
        tasks = []
        for prompt, gap in zip(prompts, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(limited(prompt)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    output = sum(r["output_tokens"] for r in ok)
    prompt_tokens = sum(r["prompt_tokens"] for r in ok)
    tpot = [(r["latency_s"] - r["ttft_s"]) / (r["output_tokens"] - 1)
            for r in ok if r["output_tokens"] > 1]
    return {
        "url": url, "model": card["id"], "rate": rate, "num_prompts": num_prompts,
        "input_len": input_len, "output_len": output_len, "max_concurrency": max_concurrency,
        "seed": seed, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (output + prompt_tokens) / duration,
        "total_output_tokens": output, "total_input_tokens": prompt_tokens,
        "ttft": _summary([r["ttft_s"] for r in ok]),
        "tpot": _summary(tpot),
        "itl": _summary([g for r in ok for g in r["itl_s"]]),
        "e2e_latency": _summary([r["latency_s"] for r in ok]),
        "requests": [{k: r[k] for k in ("ok", "error", "latency_s", "ttft_s", "output_tokens")}
                     for r in results],
    }


def bench_serve(url: str, *, model: str | None = None, rate: float = math.inf,
                num_prompts: int = 100, input_len: int = 512, output_len: int = 128,
                max_concurrency: int | None = None, seed: int = 0, timeout_s: float = 600.0,
                out: Path | None = None) -> dict:
    report = asyncio.run(_bench(url.rstrip("/"), model, rate, num_prompts, input_len, output_len,
                                max_concurrency, seed, timeout_s))
    if out is not None:
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def format_report(r: dict) -> str:
    rate = "inf" if math.isinf(r["rate"]) else f"{r['rate']:g}"
    lines = [
        f"bench-serve: {r['url']} model {r['model']}, {r['num_prompts']} requests at {rate}/s, "
        f"{r['input_len']} prompt + {r['output_len']} output tokens",
        f"  successful requests:      {r['completed']} ({r['failed']} failed)",
        f"  duration:                 {r['duration_s']:.2f} s",
        f"  request throughput:       {r['request_throughput']:.2f} req/s",
        f"  output token throughput:  {r['output_throughput']:.1f} tok/s",
        f"  total token throughput:   {r['total_token_throughput']:.1f} tok/s",
    ]
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e_latency", "E2E")):
        s = r[key]
        lines.append(f"  {name:<5} mean {s['mean_ms']:9.2f} ms  p50 {s['p50_ms']:9.2f} ms  "
                     f"p99 {s['p99_ms']:9.2f} ms")
    for error in r["errors"]:
        lines.append(f"  error: {error}")
    return "\n".join(lines)
