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


# A JSON report with these keys is one of ours: --out may replace it without --force.
REPORT_KEYS = ("url", "num_prompts", "request_throughput", "ttft")
DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN = 512, 128


def base_url(url: str) -> str:
    """The server's root from what users paste: ``http://host:8000``, with or without a
    trailing ``/`` or ``/v1`` (the OpenAI client's base URL)."""
    from urllib.parse import urlsplit

    from adp_pass.errors import UsageError

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--url {url!r} is not an http:// or https:// address", flag="--url",
                         hint="e.g. --url http://127.0.0.1:8000")
    if parts.query or parts.fragment:
        raise UsageError(f"--url {url!r} has a query or fragment", flag="--url",
                         hint="give the server's address only, e.g. http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{parts.netloc}{path}"


def lengths(input_len: int | None, output_len: int | None, max_model_len: int | None,
            model: str) -> tuple[int, int]:
    """The request shape: what was asked, else 512 + 128 shrunk to the server's context;
    a shape that cannot fit is refused before any request is sent."""
    if max_model_len and (input_len is None or output_len is None):
        if input_len is None and output_len is None:
            if DEFAULT_INPUT_LEN + DEFAULT_OUTPUT_LEN > max_model_len:
                output_len = max(1, min(DEFAULT_OUTPUT_LEN, max_model_len // 4))
                input_len = max_model_len - output_len
        elif input_len is None:
            input_len = max(1, min(DEFAULT_INPUT_LEN, max_model_len - output_len))
        else:
            output_len = max(1, min(DEFAULT_OUTPUT_LEN, max_model_len - input_len))
    input_len = DEFAULT_INPUT_LEN if input_len is None else input_len
    output_len = DEFAULT_OUTPUT_LEN if output_len is None else output_len
    if max_model_len and (input_len < 1 or output_len < 1 or
                          input_len + output_len > max_model_len):
        from adp_pass.errors import UsageError

        raise UsageError(f"--input-len {input_len} + --output-len {output_len} is more than "
                         f"model {model}'s max_model_len {max_model_len} on this server",
                         flag="--input-len", hint=f"keep them within {max_model_len} together")
    return input_len, output_len


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


async def _bench(url: str, model: str | None, rate: float, num_prompts: int,
                 input_len: int | None, output_len: int | None, max_concurrency: int | None,
                 seed: int, timeout_s: float, api_key: str | None = None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s, connect=10),
                                 headers=headers,
                                 limits=httpx.Limits(max_connections=None,
                                                     max_keepalive_connections=None)) as client:
        try:
            response = await client.get("/v1/models", timeout=10)
            if response.status_code == 401:
                raise BenchError(f"--url {url}: the server needs an API key", flag="--url",
                                 hint="set ADP_API_KEY to one of its keys")
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
        input_len, output_len = lengths(input_len, output_len, card.get("max_model_len"),
                                        card["id"])
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
                num_prompts: int = 100, input_len: int | None = None,
                output_len: int | None = None, max_concurrency: int | None = None, seed: int = 0,
                timeout_s: float = 600.0, out: Path | None = None,
                api_key: str | None = None) -> dict:
    """``input_len`` / ``output_len`` None: 512 + 128, shrunk to the server's context."""
    report = asyncio.run(_bench(url.rstrip("/"), model, rate, num_prompts, input_len, output_len,
                                max_concurrency, seed, timeout_s, api_key))
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
        if math.isnan(s["mean_ms"]):  # no request gave this figure: say so, not "nan"
            lines.append(f"  {name:<5} - (no request "
                         f"{'completed' if not r['completed'] else 'gave this figure'})")
            continue
        lines.append(f"  {name:<5} mean {s['mean_ms']:9.2f} ms  p50 {s['p50_ms']:9.2f} ms  "
                     f"p99 {s['p99_ms']:9.2f} ms")
    for error in r["errors"]:
        lines.append(f"  error: {error}")
    return "\n".join(lines)
