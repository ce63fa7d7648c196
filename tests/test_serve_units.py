"""adp serve's parts that need no server: the router, stop strings in streamed text, the request
checks, the engine's cancel and per-request seeds."""

import random

import pytest
import torch

from adp_pass.serving.app import TextStream
from adp_pass.serving.protocol import APIError, ModelLimits, parse_chat, parse_completion
from adp_pass.serving.router import Overloaded, Router
from adp_pass.tokenizer import ByteTokenizer

LIMITS = ModelLimits("tiny", vocab_size=256, max_model_len=512, kv_tokens=1024)


def _simulate(pick, groups=4, steps=2000, seed=0):
    """Requests arrive one per step, long (2000 tokens) or short (20) at random; every group
    generates one token per running request per step. Returns the worst imbalance seen after
    warm-up (largest over mean tokens in flight)."""
    rng = random.Random(seed)
    router = Router(groups, max_queue=10**9)
    live: list[tuple[int, str, int]] = []  # (group, id, tokens left)
    worst = 1.0
    for step in range(steps):
        length = rng.choice([2000, 20, 20, 20])
        group = pick(router, step, length)
        router.add(group, f"r{step}", 16, length)
        live.append((group, f"r{step}", length))
        nxt = []
        for g, rid, left in live:
            router.progress(g, rid, 1)
            if left > 1:
                nxt.append((g, rid, left - 1))
            else:
                router.remove(g, rid)
        live = nxt
        if step > 500:
            worst = max(worst, router.imbalance())
    return worst


def test_router_keeps_long_short_mix_balanced():
    by_load = _simulate(lambda r, step, n: r.pick(16, n))
    round_robin = _simulate(lambda r, step, n: step % r.groups)
    # Round robin lets long requests pile up on some ranks; the load rule keeps them even.
    assert by_load < 1.05, by_load
    assert round_robin > 1.15, round_robin


def test_router_queue_limit_dead_groups_and_ties():
    router = Router(2, max_queue=1)
    assert [router.pick(4, 4) for _ in range(1)] == [0]
    router.add(0, "a", 4, 4)
    assert router.pick(4, 4) == 1
    router.add(1, "b", 4, 4)
    with pytest.raises(Overloaded):  # both queues hold one request without a token yet
        router.pick(4, 4)
    router.progress(0, "a", 1)  # a runs: group 0 has room again
    assert router.pick(4, 4) == 0
    assert router.mark_dead(1) == ["b"]
    assert router.pick(1, 1) == 0 and router.imbalance() == 1.0
    idle = Router(3, max_queue=8)
    picks = []
    for i in range(6):  # one at a time, each finishing before the next: still spread
        g = idle.pick(8, 8)
        idle.add(g, str(i), 8, 8)
        idle.remove(g, str(i))
        picks.append(g)
    assert picks == [0, 1, 2, 0, 1, 2]


def test_text_stream_holds_back_stop_strings():
    tok = ByteTokenizer()
    stream = TextStream(tok, ["END"])
    out = [stream.push(tok.encode(piece)) for piece in ["hello E", "N", "D tail"]]
    assert "".join(out) == "hello " and stream.stopped
    plain = TextStream(tok, [])
    assert plain.push([0xC3]) == ""  # half of "é": held until the rest comes
    assert plain.push([0xA9], final=True) == "é"
    longest = TextStream(tok, ["xy", "abc"])
    assert longest.push(tok.encode("12ab")) == "12"  # "ab" may still become "abc"
    assert longest.push(tok.encode("z"), final=True) == "abz"


def test_text_stream_sends_each_whole_character_at_once():
    # Random weights generate ids above 255, which the byte tokenizer decodes as a whole U+FFFD:
    # each is text at once (held to the end, the first token would seem to come last).
    tok = ByteTokenizer()
    stream = TextStream(tok, [])
    assert [stream.push([t]) for t in (300, 301, 65, 0xC3, 0xA9, 400)] == [
        "\ufffd", "\ufffd", "A", "", "é", "\ufffd"]

    class NoHint:  # a tokenizer that cannot tell: a trailing U+FFFD waits 3 tokens at most
        decode = staticmethod(lambda ids: "".join("\ufffd" if i > 255 else chr(i) for i in ids))

    plain = TextStream(NoHint(), [])
    assert [plain.push([t]) for t in (300, 301, 302, 303)] == ["", "", "", "\ufffd" * 4]


def test_request_checks_defaults_and_batches():
    tok = ByteTokenizer()
    gen = parse_completion({"prompt": "hi"}, LIMITS, tok)
    assert gen.prompts == [[104, 105]] and gen.max_tokens == 16 and gen.n == 1
    gen = parse_completion({"prompt": [[1, 2], "ab"], "n": 2, "stop": "x", "seed": 3}, LIMITS, tok)
    assert gen.prompts == [[1, 2], [97, 98]] and gen.n == 2 and gen.stop == ["x"]
    chat = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                       "max_completion_tokens": 5}, LIMITS, tok)
    assert chat.max_tokens == 5 and tok.decode(chat.prompts[0]).endswith("<|assistant|>")
    # Chat without a length: up to the context, as vLLM.
    assert parse_chat({"messages": [{"role": "user", "content": "q"}]}, LIMITS, tok).max_tokens \
        == LIMITS.max_model_len - len(chat.prompts[0])
    with pytest.raises(APIError) as err:
        parse_completion({"prompt": "hi", "max_tokens": 600}, LIMITS, tok)
    assert err.value.param == "max_tokens" and "at most 510" in err.value.message


def _tiny_engine(max_batch=4):
    from adp_pass.runtime.engine import RankEngine
    from adp_pass.runtime.kv_cache import PagedKVCache

    vocab = 32

    class Echo(torch.nn.Module):  # logits from the input ids only: a model needing no weights
        def forward(self, ids, positions, slots, tables, lens):
            return (torch.nn.functional.one_hot((ids * 7 + positions) % vocab, vocab).float(),)

    cache = PagedKVCache(1, 8, 16, 1, 8, dtype=torch.float32, device="cpu")
    return RankEngine(Echo(), cache, max_batch=max_batch)


def test_engine_cancel_frees_blocks_and_seeds_are_per_request():
    from adp_pass.runtime.engine import Request
    from adp_pass.runtime.sampling import RowSampling, SamplingParams, sample

    engine = _tiny_engine()
    engine.add(Request("a", [1, 2, 3], SamplingParams(8)))
    engine.add(Request("b", [4, 5, 6], SamplingParams(8)))
    engine.step()
    assert engine.partial_tokens().keys() == {"a", "b"}
    used = engine.cache.num_blocks - engine.cache.num_free_blocks
    assert used > 0 and engine.cancel("a") and not engine.cancel("a")
    assert engine.cache.num_blocks - engine.cache.num_free_blocks < used
    engine.add(Request("c", [1], SamplingParams(2)))
    assert engine.cancel("c")  # still waiting: taken off the queue
    assert engine.cancel("b") and engine.cache.num_free_blocks == engine.cache.num_blocks
    assert not engine.has_work
    # A seeded row draws the same token whatever shares its batch.
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, seed=5)] * 3
    alone = sample(logits[:1], RowSampling.of(params[:1], [5], [2]))
    batch = sample(logits, RowSampling.of(params, [5, 6, 7], [2, 0, 1]))
    assert alone[0] == batch[0]


def test_checkpoint_chat_template_and_end_of_text(tmp_path):
    """A checkpoint's tokenizer brings its chat template and end-of-text id (HFTokenizer, the
    path --checkpoint serving takes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from adp_pass.tokenizer import HFTokenizer

    vocab = {"[UNK]": 0, "<eos>": 1, "user": 2, "assistant": 3, "hi": 4, ":": 5}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                          "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
    fast.save_pretrained(tmp_path)
    tok = HFTokenizer(tmp_path)
    assert tok.eos_token_ids == (1,)
    assert tok.chat_prompt([{"role": "user", "content": "hi"}]) == [2, 5, 4, 3, 5]
    limits = ModelLimits("ckpt", vocab_size=len(vocab), max_model_len=64, kv_tokens=64)
    gen = parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, limits,
                     tok)
    assert gen.prompts == [[2, 5, 4, 3, 5]] and gen.max_tokens == 2


def test_text_stream_is_incremental_and_agrees_with_one_decode():
    """Token by token, the deltas add up to the decode of all ids (invalid bytes, ids past the
    byte range and split characters included), decoding only a short window each time."""
    tok = ByteTokenizer()
    rng = random.Random(3)
    ids = list("naïve café — ünïcödé ".encode()) + [rng.randrange(300) for _ in range(200)]
    calls = []

    class Counting(ByteTokenizer):
        def decode(self, part):
            calls.append(len(part))
            return super().decode(part)

    stream = TextStream(Counting(), [])
    out = [stream.push([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(out) == tok.decode(ids)
    assert max(calls) < len(ids) // 4  # a window, never the whole output


def test_steps_waiting_for_a_busy_client_come_merged():
    import asyncio

    from adp_pass.serving.state import Flight, RankLost, ServingState

    async def read(events):
        flight = Flight("r", 0, 3, 8, 0.0)
        for event in events:
            flight.events.put_nowait(event)
        return [item async for item in ServingState.tokens(None, flight)]

    steps = [("tokens", [1], None, None), ("tokens", [2, 3], None, None),
             ("tokens", [4], "length", None)]
    assert asyncio.run(read(steps)) == [([1, 2, 3, 4], "length")]
    with pytest.raises(RankLost, match="rank 1 died"):
        asyncio.run(read([("tokens", [1], None, None), ("error", [], None, "rank 1 died")]))


def test_bench_serve_url_lengths_and_an_empty_report():
    """bench-serve takes the URL users paste (the openai client's /v1 too), fits its default
    512 + 128 tokens to the server's context (the tiny preset has 512 positions), refuses a
    shape that cannot fit before sending anything, and prints no "nan" when nothing completed."""
    from adp_pass.errors import UsageError
    from adp_pass.serving.bench import base_url, format_report, lengths

    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"):
        assert base_url(url) == "http://h:8000"
    for url in ("h:8000", "ftp://h", "http://h:8000/v1?x=1"):
        with pytest.raises(UsageError):
            base_url(url)
    assert lengths(None, None, 4096, "m") == (512, 128)
    assert lengths(None, None, 512, "tiny") == (384, 128)
    assert lengths(100, None, 512, "tiny") == (100, 128)
    assert lengths(None, 500, 512, "tiny") == (12, 500)
    assert lengths(None, None, None, "m") == (512, 128)  # a server that does not say
    with pytest.raises(UsageError, match="max_model_len 512"):
        lengths(512, 128, 512, "tiny")
    empty = {"mean_ms": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan")}
    text = format_report({"url": "u", "model": "m", "rate": float("inf"), "num_prompts": 3,
                          "input_len": 4, "output_len": 2, "completed": 0, "failed": 3,
                          "duration_s": 1.0, "request_throughput": 0.0, "output_throughput": 0.0,
                          "total_token_throughput": 0.0, "ttft": empty, "tpot": empty,
                          "itl": empty, "e2e_latency": empty, "errors": ["HTTP 400: ..."]})
    assert "nan" not in text and "no request completed" in text and "HTTP 400" in text


# ----------------------------------------------------------------------------- restarts
class _Writer:
    """A rank link's writer that keeps what the front end sends."""

    def __init__(self):
        self.sent = []

    def write(self, data):
        self.sent.append(data)

    def close(self):
        pass


def test_group_out_of_restart_attempts_is_given_up_and_the_last_one_fails_the_server(
        tmp_path, monkeypatch):
    """The restart machinery without real ranks: every restart's job exits at once (code 3).
    A dead group's request fails, the group restarts with backoff, is given up after its
    attempts (/health "degraded", the other group still routed); when the last group is given
    up too, the server fails (exit code 1)."""
    import asyncio
    import sys
    import time

    from adp_pass.mapping import Mapping
    from adp_pass.serving import ranks as ranks_module
    from adp_pass.serving.ranks import RankSet, RestartPolicy
    from adp_pass.serving.state import ServingState

    monkeypatch.setattr(ranks_module, "torchrun_command",
                        lambda *a, **k: [sys.executable, "-c", "raise SystemExit(3)"])

    async def scenario():
        ranks = RankSet(Mapping.parse("tp=2,attn_dp=1"), tmp_path, tmp_path / "ranks.log",
                        echo=False, restart=RestartPolicy(attempts=2, backoff_s=0.01))
        ranks.log_path.write_text("")
        state = ServingState(ranks, LIMITS, ByteTokenizer(), max_queue=4, shutdown_timeout_s=1)
        for unit in ranks.units:  # as after a start: both served
            unit.state, unit.up_since = "up", time.monotonic()
        for info in ranks.ranks.values():
            info.state, info.dp_rank, info.reports, info.writer = "ready", info.rank, True, \
                _Writer()
        gen = parse_completion({"prompt": [1, 2], "max_tokens": 4}, LIMITS, ByteTokenizer())
        flights = state.submit(gen) + state.submit(gen)  # one per group (ties alternate)
        assert sorted(f.group for f in flights) == [0, 1]
        lost = next(f for f in flights if f.group == 1)

        ranks._lost(ranks.ranks[1], "killed")
        assert ranks.units[1].state == "restarting"
        kind, _, _, why = lost.events.get_nowait()
        assert kind == "error" and "rank 1 died (killed)" in why and "restarting" in why
        code, health = state.health()
        assert (code, health["status"], health["live_dp_groups"]) == (200, "restarting", [0])
        assert state.submit(gen)[0].group == 0  # routed around the restarting group

        await asyncio.wait_for(ranks.units[1].task, 20)
        unit = ranks.units[1]
        assert (unit.state, unit.spent, unit.failed_starts, unit.restarts) == ("failed", 2, 2, 0)
        assert "exited with code 3" in unit.error
        code, health = state.health()
        assert (code, health["status"], health["live_dp_groups"]) == (200, "degraded", [0])
        assert 'adp_group_restart_failures_total{dp_rank="1"} 2' in state.metrics()
        assert not state.failed

        ranks._lost(ranks.ranks[0], "killed")
        code, health = state.health()
        assert (code, health["status"]) == (503, "restarting")
        with pytest.raises(APIError) as refused:
            state.submit(gen)
        assert refused.value.status == 503 and refused.value.code == "restarting"
        assert refused.value.headers["Retry-After"]
        await asyncio.wait_for(ranks.units[0].task, 20)
        assert state.failed and state.exit_code == 1 and state.stop_event.is_set()
        assert state.health()[0] == 503

    asyncio.run(asyncio.wait_for(scenario(), 60))
