"""adp serve as users run it: a real server process (two gloo ranks, preset tiny) and the real
``openai`` client and raw HTTP against it. One server for the module (its start is most of the
cost); the tests that damage it (a rank killed, SIGTERM) come last, in file order. The
collective mapping (two torchrun agents as two nodes, fail-fast) has a server of its own and is
opt-in (-m full).

The server runs with a small KV cache (16 blocks of 16 tokens per rank) so that two long
requests fill a rank and the next one waits in its queue (backpressure)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.multirank

START_TIMEOUT_S = 240  # two tiny ranks built from scratch on 2 shared cores
REQUEST_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "adp_pass.cli", "serve", "--port", str(self.port), *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"adp serve exited with {self.process.returncode}:\n"
                                     f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"adp serve not ready in {START_TIMEOUT_S} s:\n"
                                     f"{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0,
                                    timeout=REQUEST_TIMEOUT_S)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        key = f"{name}{{{want}}}" if want else name
        for line in text.splitlines():
            if line.split(" ")[0] == key:
                return float(line.split(" ")[1])
        raise KeyError(f"{key} not in /metrics")

    def post(self, path: str, body, **kw) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(f"{self.url}{path}", content=content, timeout=REQUEST_TIMEOUT_S,
                          headers={"content-type": "application/json"}, **kw)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = Server("--preset", "tiny", "--world-size", "2", "--num-blocks", "16",
                 "--max-queue", "1", "--shutdown-timeout", "20", log=log)
    yield srv
    srv.stop()


def wait_for(condition, timeout_s=20.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


# ----------------------------------------------------------------------------- the API
def test_models_health_and_greedy_completions_agree_across_ranks(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    health = server.health()
    assert health["status"] == "ok" and [r["state"] for r in health["ranks"]] == ["ready"] * 2
    # Two requests one after the other go to the two ranks (the router's tie rule); greedy
    # decoding of the same prompt on both gives the same text: the ranks hold the same model.
    before = [server.metric("adp_routed_requests_total", dp_rank=g) for g in (0, 1)]
    outs = [server.client.completions.create(model="tiny", prompt="Hello", max_tokens=3,
                                             temperature=0) for _ in range(2)]
    after = [server.metric("adp_routed_requests_total", dp_rank=g) for g in (0, 1)]
    assert [a - b for a, b in zip(after, before)] == [1, 1]
    assert outs[0].choices[0].text == outs[1].choices[0].text
    assert outs[0].choices[0].finish_reason == "length"
    assert outs[0].usage.prompt_tokens == 5 and outs[0].usage.completion_tokens == 3
    for histogram in ("adp_time_to_first_token_seconds", "adp_time_per_output_token_seconds",
                      "adp_e2e_request_latency_seconds"):
        assert server.metric(f"{histogram}_count") >= 2, histogram
    assert server.metric("adp_generation_tokens_total") >= 6
    assert server.metric("adp_requests_total", outcome="ok") >= 2


def test_served_text_is_the_engines_own_greedy_output(server):
    """What comes over HTTP (streamed and whole) is what rank 1's engine generates in this
    process from the same build (loaded from the session's build cache the server filled)."""
    import torch

    from adp_pass.presets import qwen3_config
    from adp_pass.runtime.build_cache import default_cache_dir
    from adp_pass.runtime.engine import RankEngine, Request
    from adp_pass.runtime.prepare import prepare_rank
    from adp_pass.runtime.sampling import SamplingParams
    from adp_pass.tokenizer import ByteTokenizer

    built = prepare_rank(qwen3_config("tiny"), "tp=2,attn_dp=1", 1, device=torch.device("cpu"),
                         num_blocks=16, max_position=256, cache_dir=default_cache_dir())
    assert built.build_cache == "hit"
    engine = RankEngine(built.model, built.cache, max_position=256)
    prompt = [72, 105, 33, 200]
    want = ByteTokenizer().decode(engine.generate([Request("r", prompt, SamplingParams(4))])[0]
                                  .tokens)
    got = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=4,
                                           temperature=0).choices[0].text
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, temperature=0, stream=True))
    assert got == want == streamed


def test_chat_stream_with_usage(server):
    chunks = list(server.client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hi"}],
        max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = server.client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hi"}], max_tokens=3, temperature=1,
        top_p=0.9, seed=11)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 3
    assert isinstance(streamed, str)


def test_seed_makes_sampling_reproducible_on_any_rank(server):
    def sample(seed):
        out = server.client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4,
                                               temperature=1.0, seed=seed)
        return out.choices[0].text

    first, second = sample(7), sample(7)  # routed to the two ranks in turn
    assert first == second
    assert sample(8) != first


def test_n_choices_and_stop_string(server):
    out = server.client.completions.create(model="tiny", prompt=[9, 10, 11], max_tokens=6,
                                           temperature=0, n=2)
    texts = [c.text for c in out.choices]
    assert len(texts) == 2 and texts[0] == texts[1] and out.usage.completion_tokens == 12
    text = texts[0]
    cut = next(i for i in range(1, len(text)) if text[i] != "\ufffd" and text[i] not in text[:i])
    stopped = server.client.completions.create(model="tiny", prompt=[9, 10, 11], max_tokens=6,
                                               temperature=0, stop=[text[cut]])
    assert stopped.choices[0].text == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"


def test_bench_serve_reports_latencies(server, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "adp_pass.cli", "bench-serve", "--url", server.url,
                          "--rate", "5", "--num-prompts", "3", "--input-len", "6",
                          "--output-len", "3", "--max-concurrency", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["completed"] == 3 and report["total_output_tokens"] == 9
    for key in ("ttft", "tpot", "itl", "e2e_latency"):
        assert 0 < report[key]["p50_ms"] <= report[key]["p99_ms"], key
    assert "TTFT" in run.stdout and "output token throughput" in run.stdout


@pytest.mark.full  # its own server and build: ~25 s on 2 cores, over CI's budget (-m full)
def test_collective_mapping_on_two_nodes_matches_then_fails_fast(server, tmp_path, monkeypatch):
    """Multi-node the standard way, on one host: two `adp serve` processes (node 0 with the
    front end, node 1 joining), each one torchrun agent, meeting at a c10d rendezvous endpoint;
    a mapping with collectives (the MLP sharded over both nodes' ranks). The same greedy text as
    the replicated server; then one rank dies: every client gets an error and both nodes exit
    within 60 s, node 0 with code 1."""
    monkeypatch.setenv("ADP_SERVE_TOKEN", "test-token-0123456789")
    common = ["--preset", "tiny", "--mapping", "tp=2,attn_dp=1,mlp_tp=2", "--nnodes", "2",
              "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--link-port", str(free_port()),
              "--num-blocks", "16"]
    log1 = tmp_path / "node1.log"
    node1 = subprocess.Popen([sys.executable, "-m", "adp_pass.cli", "serve", *common,
                              "--node-rank", "1"], stdout=log1.open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        nodes = Server(*common, "--node-rank", "0", log=tmp_path / "node0.log")
        prompt = dict(model="tiny", prompt=[5, 6, 7, 8], max_tokens=4, temperature=0)
        assert nodes.client.completions.create(**prompt).choices[0].text == \
            server.client.completions.create(**prompt).choices[0].text
        streams = [Stream(nodes, 100), Stream(nodes, 100)]
        wait_for(lambda: all(s.chunks for s in streams), what="both ranks generating")
        killed = time.monotonic()
        os.kill(nodes.health()["ranks"][1]["pid"], signal.SIGKILL)
        assert nodes.process.wait(60) == 1
        node1.wait(max(1.0, 60 - (time.monotonic() - killed)))
        assert time.monotonic() - killed < 60
        for stream in streams:
            stream.thread.join(10)
            assert "rank 1 died" in str(stream.error), stream.error
        assert "keeps collectives" in nodes.log.read_text()
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
        if "nodes" in locals():
            nodes.stop()


@pytest.mark.full  # its own server and build (-m full)
def test_checkpoint_is_served_with_its_tokenizer_and_matches_transformers(tmp_path):
    """--checkpoint: weights, tokenizer and chat template from the directory; greedy tokens over
    HTTP equal transformers' generate on the same checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

    from adp_pass.presets import qwen3_config

    root = tmp_path / "ckpt"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(qwen3_config("tiny")).eval()
    model.save_pretrained(root)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", eos_token="w1")
    fast.chat_template = ("{% for m in messages %}w2 {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}w3{% endif %}")
    fast.save_pretrained(root)
    ckpt = Server("--checkpoint", str(root), "--world-size", "2", "--num-blocks", "16",
                  log=tmp_path / "checkpoint.log")
    try:
        prompt = [5, 9, 17, 33, 65]
        out = ckpt.client.completions.create(model=str(root), prompt=prompt, max_tokens=6,
                                             temperature=0, extra_body={"ignore_eos": True})
        got = [int(w[1:]) for w in out.choices[0].text.split()]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = model.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                  attention_mask=torch.ones_like(ids))[0, len(prompt):].tolist()
        assert got == want
        chat = ckpt.client.chat.completions.create(
            model=str(root), messages=[{"role": "user", "content": "w7 w8"}], max_tokens=3)
        assert chat.usage.prompt_tokens == 4  # w2 w7 w8 w3: the checkpoint's template
    finally:
        ckpt.stop()


@pytest.mark.full  # its own server and build (-m full)
def test_hung_rank_is_killed_and_only_its_requests_fail(tmp_path):
    """A rank that stops answering (SIGSTOP: a stuck kernel, say) is taken as dead after
    --rank-timeout: its request fails, the other rank keeps serving."""
    hung = Server("--preset", "tiny", "--world-size", "2", "--num-blocks", "16",
                  "--rank-timeout", "4", log=tmp_path / "hung.log")
    streams = []
    try:
        streams += [Stream(hung, 100), Stream(hung, 100)]
        wait_for(lambda: all(s.chunks for s in streams), what="both ranks generating")
        os.kill(hung.health()["ranks"][1]["pid"], signal.SIGSTOP)
        wait_for(lambda: any(s.error is not None for s in streams), timeout_s=30,
                 what="the hung rank's request failing")
        failed = [s for s in streams if s.error is not None]
        assert len(failed) == 1 and "hung" in str(failed[0].error)
        assert hung.health()["live_dp_groups"] == [0]
        assert hung.client.completions.create(model="tiny", prompt="x", max_tokens=1).choices
    finally:
        for stream in streams:
            stream.close()
        hung.stop()


@pytest.mark.full  # starts ranks (-m full)
def test_a_rank_that_cannot_start_ends_the_server_with_its_own_error(tmp_path):
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "adp_pass.cli", "serve", "--port", str(port),
                           "--preset", "tiny", "--world-size", "2", "--num-blocks", "10000000",
                           "--max-model-len", "512"], capture_output=True, text=True,
                          timeout=START_TIMEOUT_S)
    assert done.returncode == 1
    assert "InsufficientMemory" in done.stderr and "KV cache" in done.stderr, done.stderr
    assert "rank logs:" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- bad requests
LONG = [1] * 300  # longer than the context (16 blocks x 16 tokens = 256)
CHAT = [{"role": "user", "content": "hi"}]
BAD = [
    ("malformed json", "/v1/completions", b'{"prompt": "a",', 400, "not valid JSON"),
    ("body is an array", "/v1/completions", [1, 2], 400, "JSON object"),
    ("empty body", "/v1/completions", b"", 400, "not valid JSON"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404, "does not exist"),
    ("model not a string", "/v1/completions", {"model": 3, "prompt": "a"}, 400, "'model'"),
    ("missing prompt", "/v1/completions", {"max_tokens": 2}, 400, "'prompt' is required"),
    ("prompt a number", "/v1/completions", {"prompt": 5}, 400, "'prompt' must be"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "empty"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "empty"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 256]}, 400, "outside the vocab"),
    ("negative token id", "/v1/completions", {"prompt": [-1, 2]}, 400, "outside the vocab"),
    ("token id a float", "/v1/completions", {"prompt": [1, 2.5]}, 400, "must be integers"),
    ("prompt longer than context", "/v1/completions", {"prompt": LONG}, 400, "context"),
    ("negative max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, ">= 1"),
    ("zero max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, ">= 1"),
    ("huge max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": 10**9}, 400, "at most"),
    ("max_tokens a string", "/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400, "integer"),
    ("max_tokens a bool", "/v1/completions", {"prompt": "a", "max_tokens": True}, 400, "integer"),
    ("max_tokens a float", "/v1/completions", {"prompt": "a", "max_tokens": 2.5}, 400, "integer"),
    ("temperature < 0", "/v1/completions", {"prompt": "a", "temperature": -0.1}, 400, "[0, 2]"),
    ("temperature > 2", "/v1/completions", {"prompt": "a", "temperature": 3}, 400, "[0, 2]"),
    ("temperature NaN", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400, "[0, 2]"),
    ("temperature a string", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400,
     "number"),
    ("top_p zero", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "(0, 1]"),
    ("top_p above 1", "/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, "(0, 1]"),
    ("too many stop strings", "/v1/completions", {"prompt": "a", "stop": list("abcde")}, 400,
     "at most 4"),
    ("stop not a string", "/v1/completions", {"prompt": "a", "stop": 7}, 400, "'stop'"),
    ("empty stop string", "/v1/completions", {"prompt": "a", "stop": [""]}, 400, "empty"),
    ("seed a string", "/v1/completions", {"prompt": "a", "seed": "x"}, 400, "'seed'"),
    ("stream not a bool", "/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "'stream'"),
    ("stream_options without stream", "/v1/completions",
     {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "only allowed"),
    ("n zero", "/v1/completions", {"prompt": "a", "n": 0}, 400, "'n'"),
    ("n too big", "/v1/completions", {"prompt": "a", "n": 1000}, 400, "'n'"),
    ("logprobs asked", "/v1/completions", {"prompt": "a", "logprobs": 3}, 400, "not supported"),
    ("penalty asked", "/v1/completions", {"prompt": "a", "presence_penalty": 1}, 400,
     "not supported"),
    ("chat without messages", "/v1/chat/completions", {"model": "tiny"}, 400, "'messages'"),
    ("chat messages empty", "/v1/chat/completions", {"messages": []}, 400, "empty"),
    ("chat messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400, "array"),
    ("chat unknown role", "/v1/chat/completions",
     {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("chat content a number", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("chat image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "text only"),
    ("chat huge max_completion_tokens", "/v1/chat/completions",
     {"messages": CHAT, "max_completion_tokens": 10**6}, 400, "at most"),
    ("chat tools", "/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]},
     400, "not supported"),
    ("unknown route", "/v1/embeddings", {"input": "a"}, 404, "no route"),
    ("body over 8 MiB", "/v1/completions", b'{"prompt": "' + b"a" * (9 << 20) + b'"}', 413,
     "at most 8 MiB"),
]


@pytest.mark.parametrize("path,body,status,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error(server, path, body, status, words):
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_requests_through_the_openai_client_and_server_stays_up(server):
    assert len(BAD) >= 30
    with pytest.raises(openai.BadRequestError) as err:
        server.client.completions.create(model="tiny", prompt="a", max_tokens=-3)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="a", max_tokens=1)
    response = httpx.get(f"{server.url}/v1/completions", timeout=10)
    assert response.status_code == 405 and "not allowed" in response.json()["error"]["message"]
    assert server.health()["status"] == "ok"
    assert server.client.completions.create(model="tiny", prompt="a", max_tokens=1).choices


# ----------------------------------------------------------------------------- load and failures
class Stream:
    """A streaming completion read on a thread: its chunks and how it ended."""

    def __init__(self, server, max_tokens, prompt=(1, 2, 3)):
        self.chunks, self.error, self.finish = [], None, None
        self.stream = server.client.completions.create(
            model="tiny", prompt=list(prompt), max_tokens=max_tokens, stream=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for chunk in self.stream:
                self.chunks.append(chunk)
                self.finish = chunk.choices[0].finish_reason or self.finish
        except Exception as err:  # noqa: BLE001 - the test looks at it
            self.error = err

    def close(self):
        self.stream.close()
        self.thread.join(10)


def test_full_cache_queues_then_429_and_disconnect_frees_kv(server):
    # Each request reserves 3 + 200 tokens = 13 of a rank's 16 blocks: one runs per rank, the
    # next waits in a rank's queue (max 1), the one after that is refused.
    running = [Stream(server, 200), Stream(server, 200)]
    wait_for(lambda: all(s.chunks for s in running), what="both ranks generating")
    assert all(server.metric("adp_kv_blocks_used", rank=r, dp_rank=r) >= 1 for r in (0, 1))
    queued = [Stream(server, 200), Stream(server, 200)]
    wait_for(lambda: server.metric("adp_queue_depth", rank=0, dp_rank=0)
             + server.metric("adp_queue_depth", rank=1, dp_rank=1) == 2, what="two queued")
    refused = server.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 200})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    for stream in running + queued:  # the clients go away
        stream.close()
    wait_for(lambda: server.metric("adp_requests_in_flight") == 0
             and server.metric("adp_kv_blocks_used", rank=0, dp_rank=0) == 0
             and server.metric("adp_kv_blocks_used", rank=1, dp_rank=1) == 0
             and server.metric("adp_queue_depth", rank=0, dp_rank=0) == 0, what="KV freed")
    assert server.metric("adp_requests_total", outcome="cancelled") >= 4
    assert server.metric("adp_load_imbalance_ratio") == 1.0


def test_non_streamed_request_is_cancelled_when_the_client_leaves(server):
    routed = sum(server.metric("adp_routed_requests_total", dp_rank=g) for g in (0, 1))
    # The client gives up and closes its connection long before 200 tokens are done, even where
    # CPU ranks run the ops' eager references (a GPU machine) rather than the interpreter.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": [4, 5], "max_tokens": 200},
                   timeout=0.3)
    wait_for(lambda: sum(server.metric("adp_routed_requests_total", dp_rank=g)
                         for g in (0, 1)) == routed + 1, what="the request reached a rank")
    wait_for(lambda: server.metric("adp_requests_in_flight") == 0
             and server.metric("adp_kv_blocks_used", rank=0, dp_rank=0) == 0
             and server.metric("adp_kv_blocks_used", rank=1, dp_rank=1) == 0, what="KV freed")


def test_dead_rank_fails_only_its_requests_and_restarts(server):
    streams = [Stream(server, 200), Stream(server, 200)]  # still generating after the kill
    wait_for(lambda: all(s.chunks for s in streams), what="both ranks generating")
    victim = server.health()["ranks"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: streams[1].error is not None or streams[0].error is not None,
             what="the dead rank's request failing")
    # Which stream went to rank 1 follows the router; exactly one fails, with the rank named.
    failed = [s for s in streams if s.error is not None]
    alive = [s for s in streams if s.error is None]
    assert len(failed) == 1 and "rank 1" in str(failed[0].error)
    seen = len(alive[0].chunks)
    wait_for(lambda: len(alive[0].chunks) > seen + 1, what="the other rank still generating")
    alive[0].close()
    # The dead rank restarts (from the build cache, after a 1 s backoff): meanwhile the server
    # says so and new requests all go to the live rank.
    health = server.health()
    assert health["status"] == "restarting" and health["live_dp_groups"] == [0], health
    assert server.metric("adp_rank_up", rank=1) == 0
    assert server.metric("adp_group_restarting", dp_rank=1) == 1
    routed = server.metric("adp_routed_requests_total", dp_rank=1)
    for _ in range(2):
        assert server.client.completions.create(model="tiny", prompt="ok", max_tokens=1).choices
    assert server.metric("adp_routed_requests_total", dp_rank=1) == routed
    wait_for(lambda: server.health()["status"] == "ok", timeout_s=120, what="rank 1 restarted")
    assert server.health()["ranks"][1]["pid"] != victim["pid"]
    assert server.metric("adp_group_restarts_total", dp_rank=1) == 1
    # Both ranks take requests again: the second of two at once goes to the idler rank.
    again = [Stream(server, 8), Stream(server, 8)]
    for stream in again:
        stream.thread.join(REQUEST_TIMEOUT_S)
    assert all(s.error is None and s.finish == "length" for s in again)
    assert server.metric("adp_routed_requests_total", dp_rank=1) == routed + 1


def test_sigterm_finishes_in_flight_requests_then_exits(server):
    stream = Stream(server, 4)
    wait_for(lambda: stream.chunks, what="generating")
    server.process.send_signal(signal.SIGTERM)
    def refused():
        try:
            return server.post("/v1/completions", {"prompt": "a"}).status_code == 503
        except httpx.HTTPError:  # already closed: refused too
            return True

    wait_for(refused, timeout_s=10, what="new requests refused")
    stream.thread.join(REQUEST_TIMEOUT_S)
    assert stream.error is None and stream.finish == "length"
    assert server.process.wait(30) == 0
    assert "adp serve: stopped" in server.log.read_text()
