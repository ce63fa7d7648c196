"""adp serve facing a network: API keys, CORS, JSON-only routes, HTTP limits enforced while a
request is read, and hostile requests. Each bad request must get a 4xx with the OpenAI error body
({"error": {"message", "type", "param", "code"}}) and leave the server healthy.

One server for the module (one tiny rank: most requests here never reach it), started with two
API keys, a short read timeout and a small queue, so that every limit is reached in well under a
second. Raw sockets send what HTTP clients refuse to send."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.multirank

KEYS = ("test-key-one", "test-key-two")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
JSON = {"content-type": "application/json"}
ORIGIN = "https://app.example"
READ_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1.0
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "adp_pass.cli", "serve", "--preset", "tiny", "--world-size",
             "1", "--num-blocks", "16", "--max-queue", "2", "--port", str(self.port),
             "--api-key", KEYS[0], "--allowed-origins", ORIGIN,
             "--read-timeout", str(READ_TIMEOUT_S), "--keep-alive-timeout", str(KEEP_ALIVE_S)],
            env=dict(os.environ, ADP_API_KEY=KEYS[1]), stdout=log.open("w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

    def request(self, method: str, path: str, body=None, headers=None, key=True):
        content = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        head = {**(AUTH if key else {}), **(JSON if content is not None else {}),
                **(headers or {})}
        return httpx.request(method, f"{self.url}{path}", content=content, headers=head,
                             timeout=60)

    def raw(self, data: bytes, wait_s: float = 10.0) -> bytes:
        """Send ``data`` as is; return what comes back until the server closes or ``wait_s``."""
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            s.sendall(data)
            return _read(s, wait_s)

    def healthy(self) -> None:
        response = httpx.get(f"{self.url}/health", timeout=10, headers=AUTH)
        assert response.status_code == 200 and response.json()["status"] == "ok", response.text

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def _read(s: socket.socket, wait_s: float) -> bytes:
    """What comes back: up to the end of the first whole response, the server's close, or
    ``wait_s``."""
    s.settimeout(wait_s)
    out = b""
    try:
        while not _whole(out):
            data = s.recv(65536)
            if not data:
                break
            out += data
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def _whole(out: bytes) -> bool:
    head, sep, body = out.partition(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n")[1:]
               if line.lower().startswith(b"content-length:")]
    return bool(sep and lengths and len(body) >= lengths[0])


def _error_of(raw: bytes) -> tuple[int, dict]:
    """(status, the OpenAI error) of a raw HTTP response; fails if the body is not one."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), raw[:300]
    status = int(head.split()[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    error = json.loads(rest[:length])["error"]  # the first answer (a pipelined one may follow)
    assert set(error) == {"message", "type", "param", "code"}, error
    return status, error


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("hardening") / "server.log")
    yield srv
    srv.stop()


def _check(response: httpx.Response, status: int, words: str, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert words in error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


# ----------------------------------------------------------------------------- keys
def test_keys_guard_the_api_and_metrics_and_health_says_little(server):
    for key in KEYS:  # --api-key and ADP_API_KEY, both
        assert server.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"}
                              ).json()["data"][0]["id"] == "tiny"
    assert server.request("GET", "/v1/models", headers={"Authorization": f"bearer {KEYS[1]}"}
                          ).status_code == 200
    missing = server.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1},
                             key=False)
    _check(missing, 401, "needs an API key", "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    for wrong in ("Bearer wrong", "Basic dGVzdDp0ZXN0", f"Bearer {KEYS[0]}x", "Bearer"):
        response = server.request("GET", "/v1/models", key=False, headers={"Authorization": wrong})
        assert response.status_code == 401, (wrong, response.text)
    _check(server.request("GET", "/metrics", key=False), 401, "API key")
    _check(server.request("GET", "/v1/no-such-route", key=False), 401, "API key")
    assert "adp_requests_total" in server.request("GET", "/metrics").text
    open_health = server.request("GET", "/health", key=False)
    assert open_health.status_code == 200 and open_health.json() == {"status": "ok"}
    full = server.request("GET", "/health").json()
    assert full["ranks"][0]["pid"] > 0 and full["model"] == "tiny"
    server.healthy()


def test_keys_are_never_logged(server):
    server.request("GET", "/v1/models", key=False, headers={"Authorization": "Bearer leaked?"})
    log = server.log.read_text()
    assert "API key required (2 keys)" in log
    assert all(key not in log for key in KEYS) and "leaked?" not in log


# ----------------------------------------------------------------------------- browsers
def test_json_routes_take_json_only_and_cors_is_for_listed_pages(server):
    simple = server.request("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}',
                            headers={"content-type": "text/plain"})
    _check(simple, 415, "application/json", "unsupported_media_type")
    _check(server.request("POST", "/v1/chat/completions", b'{}', headers={
        "content-type": "application/x-www-form-urlencoded"}), 415, "application/json")
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    ok = server.request("OPTIONS", "/v1/completions", key=False, headers=preflight)
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"]
    evil = server.request("OPTIONS", "/v1/completions", key=False,
                          headers={**preflight, "Origin": "https://evil.example"})
    _check(evil, 403, "may not call this server", "origin_not_allowed")
    assert "access-control-allow-origin" not in evil.headers
    listed = server.request("GET", "/v1/models", headers={"Origin": ORIGIN})
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    other = server.request("GET", "/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    server.healthy()


# ----------------------------------------------------------------------------- HTTP limits
def test_chunked_body_is_refused_as_it_passes_the_limit(server):
    """A chunked body has no declared length: it is counted as it arrives and refused once it
    passes 8 MiB, without the rest being read (the 413 arrives while the client still sends)."""
    chunk = b"a" * (1 << 20)
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + KEYS[0].encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        while sent < 300 << 20 and not select.select([s], [], [], 0)[0]:
            try:
                s.sendall(framed)
            except OSError:
                break
            sent += len(chunk)
        status, error = _error_of(_read(s, 10))
    assert status == 413 and error["code"] == "body_too_large", error
    assert sent < 64 << 20, f"the answer came only after {sent >> 20} MiB"
    server.healthy()


def test_declared_body_over_the_limit_is_refused_unread(server):
    out = server.raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEYS[0].encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 300000000\r\nExpect: 100-continue\r\n\r\n", wait_s=5)
    status, error = _error_of(out)
    assert status == 413 and "at most 8 MiB" in error["message"]
    server.healthy()


def test_short_body_times_out_with_408(server):
    start = time.monotonic()
    out = server.raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEYS[0].encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\":", wait_s=10)
    status, error = _error_of(out)
    assert status == 408 and "10 of 100 bytes" in error["message"], error
    assert time.monotonic() - start < READ_TIMEOUT_S + 3
    server.healthy()


def test_slow_headers_time_out_with_408_and_idle_connections_close(server):
    start = time.monotonic()
    status, error = _error_of(server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n", wait_s=10))
    assert status == 408 and "headers did not arrive" in error["message"]
    assert time.monotonic() - start < READ_TIMEOUT_S + 3
    start = time.monotonic()
    assert server.raw(b"", wait_s=10) == b""  # never sends a byte: closed after keep-alive
    assert time.monotonic() - start < KEEP_ALIVE_S + 3
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # idle after a request
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in _read(s, 10)
        start = time.monotonic()
        s.settimeout(10)
        assert s.recv(100) == b""  # the server closes it
        assert KEEP_ALIVE_S - 0.5 < time.monotonic() - start < KEEP_ALIVE_S + 3
    server.healthy()


def test_huge_and_numerous_headers_get_431(server):
    big = server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    status, error = _error_of(big)
    assert status == 431 and error["code"] == "headers_too_large", error
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
    status, error = _error_of(server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"))
    assert status == 431 and "2001 headers" in error["message"], error
    server.healthy()


# ----------------------------------------------------------------------------- hostile bodies
DEEP = b'{"prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BODIES = [
    ("lone surrogate in prompt", "/v1/completions", b'{"prompt": "hi \\ud800"}', "prompt",
     "invalid_unicode"),
    ("lone surrogate in chat content", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content",
     "invalid_unicode"),
    ("lone surrogate in a content part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content[0].text", "invalid_unicode"),
    ("lone surrogate in model", "/v1/completions", b'{"model": "\\udc80", "prompt": "a"}',
     "model", "invalid_unicode"),
    ("lone surrogate in a stop string", "/v1/completions",
     b'{"prompt": "a", "stop": ["\\ud800"]}', "stop[0]", "invalid_unicode"),
    ("lone surrogate in a key", "/v1/completions", b'{"prompt": "a", "\\ud800": 1}', None,
     "invalid_unicode"),
    ("100,000-deep JSON", "/v1/completions", DEEP, None, "invalid_json"),
    ("40-deep JSON", "/v1/completions", b'{"prompt": "a", "x": ' + b"[" * 40 + b"]" * 40 + b"}",
     None, "invalid_json"),
    ("a 5000-digit number", "/v1/completions", b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}",
     None, "invalid_json"),
    ("body in UTF-16", "/v1/completions", '{"prompt": "a"}'.encode("utf-16"), None,
     "invalid_json"),
    ("invalid UTF-8 bytes", "/v1/completions", b'{"prompt": "\xff\xfe"}', None, "invalid_json"),
    ("max_tokens infinite", "/v1/completions", b'{"prompt": "a", "max_tokens": 1e400}',
     "max_tokens", None),
    ("model an object", "/v1/completions", b'{"model": {"$ne": 1}, "prompt": "a"}', "model",
     None),
    ("top_k", "/v1/completions", b'{"prompt": "a", "top_k": 40}', "top_k",
     "unsupported_parameter"),
    ("min_p", "/v1/completions", b'{"prompt": "a", "min_p": 0.05}', "min_p",
     "unsupported_parameter"),
    ("repetition_penalty", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "a"}], "repetition_penalty": 1.2}',
     "repetition_penalty", "unsupported_parameter"),
    ("stop_token_ids", "/v1/completions", b'{"prompt": "a", "stop_token_ids": [5]}',
     "stop_token_ids", "unsupported_parameter"),
    ("top_k a boolean", "/v1/completions", b'{"prompt": "a", "top_k": true}', "top_k",
     "unsupported_parameter"),
    # max-queue 2 x 1 group: 3 choices could never all wait at once; 429 would be retried forever
    ("more choices than every queue", "/v1/completions", b'{"prompt": "a", "n": 3}', "n",
     "too_many_choices"),
    ("a batch of prompts x n beyond every queue", "/v1/completions",
     b'{"prompt": ["a", "b"], "n": 2}', "n", "too_many_choices"),
]


@pytest.mark.parametrize("path,body,param,code", [b[1:] for b in BODIES],
                         ids=[b[0] for b in BODIES])
def test_hostile_body_gets_400_by_name(server, path, body, param, code):
    response = server.request("POST", path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param and param.split(".")[0].split("[")[0] in error["message"]
    if code is not None:
        assert error["code"] == code, error
    assert "\\ud" not in response.text.lower() or code == "invalid_unicode"
    server.healthy()


def test_off_values_of_vllm_fields_are_served(server):
    out = server.request("POST", "/v1/completions", {
        "prompt": "hi", "max_tokens": 1, "top_k": -1, "min_p": 0, "repetition_penalty": 1.0,
        "stop_token_ids": [], "n": 2})
    assert out.status_code == 200, out.text
    assert [c["index"] for c in out.json()["choices"]] == [0, 1]
    assert "not supported by adp serve yet" in server.request(
        "POST", "/v1/completions", {"prompt": "a", "top_k": 5}).json()["error"]["message"]


def test_bench_serve_takes_the_key_and_a_v1_url(server, monkeypatch, capsys):
    from adp_pass import cli

    argv = ["bench-serve", "--url", f"{server.url}/v1", "--num-prompts", "1", "--input-len", "4",
            "--output-len", "1"]
    monkeypatch.delenv("ADP_API_KEY", raising=False)
    assert cli.main(argv) == 1 and "needs an API key" in capsys.readouterr().err
    monkeypatch.setenv("ADP_API_KEY", KEYS[1])
    code = cli.main(argv)
    out = capsys.readouterr().out
    assert code == 0 and "successful requests:      1 (0 failed)" in out, out


# ----------------------------------------------------------------------------- hostile HTTP
def _http(head: bytes) -> bytes:
    return head.replace(b"KEY", KEYS[0].encode())


RAW = [  # (name, bytes sent, status, words in the message)
    ("PUT on a POST route", b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
     b"KEY\r\nContent-Length: 0\r\n\r\n", 405, "not allowed"),
    ("DELETE /health", b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not allowed"),
    ("OPTIONS without a preflight", b"OPTIONS /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Authorization: Bearer KEY\r\n\r\n", 405, "not allowed"),
    ("TRACE", b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer KEY\r\n\r\n",
     405, "not allowed"),
    ("lower-case method", b"get /health HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not allowed"),
    ("unknown route", b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no route"),
    ("dot-dot path", b"GET /v1/../health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer KEY\r\n\r\n",
     404, "no route"),
    ("absolute-form target", b"GET http://evil.example/admin HTTP/1.1\r\nHost: x\r\n\r\n", 404,
     "no route"),
    ("NUL in the model path", b"GET /v1/models/%00 HTTP/1.1\r\nHost: x\r\nAuthorization: "
     b"Bearer KEY\r\n\r\n", 404, "does not exist"),
    ("non-ASCII request line", b"GET /h\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed"),
    ("garbage request line", b"HELLO\r\n\r\n", 400, "malformed"),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 404, "no route"),
    ("header without a colon", b"GET /health HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400,
     "malformed"),
    ("CR inside a header value", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400,
     "malformed"),
    ("no Host in HTTP/1.1", b"GET /health HTTP/1.1\r\n\r\n", 400, "malformed"),
    ("Content-Length and Transfer-Encoding (smuggling)", b"POST /v1/completions HTTP/1.1\r\n"
     b"Host: x\r\nAuthorization: Bearer KEY\r\nContent-Type: application/json\r\n"
     b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     "both Content-Length and Transfer-Encoding"),
    ("two different Content-Lengths", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 2\r\nContent-Length: 5\r\n\r\n{}", 400, "malformed"),
    ("negative Content-Length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: -1\r\n\r\n", 400, "malformed"),
    ("Transfer-Encoding gzip", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: gzip\r\n\r\n", 400, "Transfer-Encoding"),
    ("bad chunk size", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
     b"KEY\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     400, "malformed"),
    ("charset utf-16", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer KEY"
     b"\r\nContent-Type: application/json; charset=utf-16\r\nContent-Length: 2\r\n\r\n{}", 415,
     "UTF-8"),
    ("no Content-Type", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer KEY"
     b"\r\nContent-Length: 2\r\n\r\n{}", 415, "application/json"),
]


@pytest.mark.parametrize("data,status,words", [r[1:] for r in RAW], ids=[r[0] for r in RAW])
def test_hostile_http_gets_a_json_4xx(server, data, status, words):
    got, error = _error_of(server.raw(_http(data), wait_s=3))
    assert got == status and words in error["message"], (got, error)
    server.healthy()



# ----------------------------------------------------------------------------- TLS (no server)
def test_tls_files_are_checked_and_passed_to_uvicorn(tmp_path):
    from adp_pass.cli import build_parser
    from adp_pass.commands.serve import _serve_security
    from adp_pass.mapping import Mapping
    from adp_pass.serving.server import ServeOptions, http_config

    tls = Path(__file__).parent / "data" / "tls"  # a test-only self-signed pair (its README)
    key, cert = tls / "key.pem", tls / "cert.pem"
    args = build_parser().parse_args(["serve", "--ssl-keyfile", str(key), "--ssl-certfile",
                                      str(cert), "--api-key", "k-1"])
    assert _serve_security(args, http=True) == ("k-1",)
    options = ServeOptions(mapping=Mapping.parse("tp=1,attn_dp=1"), model_name="tiny",
                           vocab_size=256, max_model_len=256, ssl_keyfile=str(key),
                           ssl_certfile=str(cert))
    config = http_config(lambda scope, receive, send: None, options)
    config.load()
    assert config.is_ssl and config.ssl is not None
