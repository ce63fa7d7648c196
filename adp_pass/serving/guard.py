"""What stands between the network and ``adp serve``'s routes: HTTP limits, enforced while a
request is read, and API keys.

Two layers, because some limits can only be seen below ASGI:

* :func:`protocol_class` is uvicorn's h11 protocol with (a) the request head (request line and
  headers) capped at ``max_head_bytes`` (431), (b) a deadline on the head, so a client that
  trickles its headers is answered 408 instead of holding the connection, (c) a new connection
  that sends nothing closed after the keep-alive timeout, (d) every protocol error answered in
  the OpenAI error format (uvicorn's own answer is plain text), and (e) a response given before
  the client finished its body closes the connection after a short linger: the client can read
  the answer instead of a reset, and cannot keep streaming a body nobody reads.
* :class:`Guard` is ASGI middleware: header count (431), a declared ``Content-Length`` over the
  body limit (413 before a byte is read), the body counted as it arrives, chunked or not (413 as
  soon as it passes the limit, the rest unread), and a deadline on the body (408).
  :class:`Cors` answers browsers' preflights for ``--allowed-origins``; :class:`KeyCheck`
  (inside it: a preflight carries no key) checks the API keys (401).

Every answer is an OpenAI error body, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import time
from dataclasses import dataclass
from http import HTTPStatus

import h11

from adp_pass.serving.protocol import MAX_BODY_BYTES, APIError


@dataclass(frozen=True)
class HTTPLimits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_headers: int = 100  # browsers send ~20; thousands of headers is abuse
    max_head_bytes: int = 16 << 10  # request line + headers
    read_timeout_s: float = 30.0  # for the head, and again for the body
    keep_alive_timeout_s: float = 5.0
    linger_s: float = 1.0  # after an early answer: let the client read it before closing


# ----------------------------------------------------------------------------- error bodies
def error_bytes(status: int, message: str, code: str | None, type_: str | None = None) -> bytes:
    return json.dumps(APIError(status, message, code=code, type=type_ or (
        "invalid_request_error" if status < 500 else "server_error")).body()).encode()


async def send_error(send, status: int, message: str, code: str | None,
                     headers: dict | None = None) -> None:
    body = error_bytes(status, message, code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ----------------------------------------------------------------------------- below ASGI
class _Connection(h11.Connection):
    """h11's connection, remembering the protocol error it raised (uvicorn drops it)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as err:
            self.last_error = err
            raise


def protocol_class(limits: HTTPLimits):
    """uvicorn's h11 protocol with ``limits`` (pass it as ``uvicorn.Config(http=...)``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, config, *args, **kwargs) -> None:
            super().__init__(config, *args, **kwargs)
            self.conn = _Connection(h11.SERVER, limits.max_head_bytes)
            self._head_timer: asyncio.TimerHandle | None = None
            self._lingering = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            # uvicorn arms its keep-alive timer only after a response: a connection that never
            # sends a byte would be kept forever.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return  # the answer is out; what the client still sends is dropped
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._head_timer = self.loop.call_later(limits.read_timeout_s, self._head_late)
            try:
                super().data_received(data)
            except Exception as err:  # noqa: BLE001 - a request uvicorn cannot take apart
                self._answer(400, f"malformed HTTP request ({type(err).__name__}); send a valid "
                             "HTTP/1.1 request", "invalid_http_request")
                return
            if self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()  # the head is in: the body has its own deadline
            if (self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY
                    and not self._lingering):
                self._linger()  # answered, and the client keeps sending a body nobody reads

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if (not self.transport.is_closing() and self.conn.our_state is h11.DONE
                    and self.conn.their_state is h11.SEND_BODY):
                self._linger()

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._answer(408, f"the request headers did not arrive within "
                             f"{limits.read_timeout_s:g} s; send the whole request at once",
                             "request_timeout")

        def _linger(self) -> None:
            """Half-close: the client reads the answer, then the connection ends (a plain close
            with its body still arriving would reset the connection and lose the answer)."""
            self._lingering = True
            self._unset_keepalive_if_required()
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(limits.linger_s, self.transport.close)
            else:
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            err = self.conn.last_error
            status = getattr(err, "error_status_hint", 400)
            if status == 431:
                message = (f"the request line and headers are over {limits.max_head_bytes >> 10} "
                           "KiB; send fewer or shorter headers")
                code = "headers_too_large"
            elif status == 501:
                status, code = 400, "invalid_http_request"
                message = ("the request's Transfer-Encoding is not supported: only "
                           "'Transfer-Encoding: chunked' is accepted")
            else:
                status, code = 400, "invalid_http_request"
                what = str(err or msg).split(": bytearray")[0]  # not the raw bytes back
                message = f"malformed HTTP request ({what}); send a valid HTTP/1.1 request"
            self._answer(status, message, code)

        def _answer(self, status: int, message: str, code: str) -> None:
            """An error answered here, below the app; then the connection closes."""
            self._cancel_head_timer()
            if self.transport.is_closing():
                return
            if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                self.transport.close()  # a response is under way: nothing valid can follow
                return
            body = error_bytes(status, message, code)
            try:
                out = self.conn.send(h11.Response(
                    status_code=status, reason=HTTPStatus(status).phrase.encode(),
                    headers=[(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode()),
                             (b"connection", b"close")]))
                out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                self.transport.close()
                return
            self.transport.write(out)
            if self.cycle is not None and not self.cycle.response_complete:
                # To the app the client is gone: its reads end, its answer is dropped.
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self._linger()  # what the client still sends must not reset the answer away

    return GuardedH11Protocol


# ----------------------------------------------------------------------------- ASGI
def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Guard:
    """ASGI middleware for the HTTP limits: header count, body size (declared and counted as it
    arrives, chunked too) and the body's deadline."""

    def __init__(self, app, limits: HTTPLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        if len(headers) > self.limits.max_headers:
            return await send_error(send, 431, f"the request has {len(headers)} headers; at most "
                                    f"{self.limits.max_headers} are accepted", "too_many_headers")
        # h11 bounds a head that arrives in pieces; one that arrives whole is measured here.
        head = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + sum(
            len(name) + len(value) + 4 for name, value in headers)
        if head > self.limits.max_head_bytes:
            return await send_error(send, 431, f"the request line and headers are over "
                                    f"{self.limits.max_head_bytes >> 10} KiB; send fewer or "
                                    "shorter headers", "headers_too_large")
        declared, chunked = None, False
        for name, value in headers:
            if name == b"content-length":
                declared = int(value)  # h11 has checked it is one non-negative integer
            elif name == b"transfer-encoding":
                chunked = True
        if declared is not None and chunked:
            # Two framings: a proxy in front might read the other one (request smuggling).
            return await send_error(send, 400, "the request has both Content-Length and "
                                    "Transfer-Encoding; send one of them",
                                    "invalid_http_request")
        if declared is not None and declared > self.limits.max_body_bytes:
            return await send_error(send, 413, _too_large(declared, self.limits),
                                    "body_too_large")
        has_body = chunked or bool(declared)
        state = {"read": 0, "done": not has_body, "started": False}
        deadline = time.monotonic() + self.limits.read_timeout_s

        async def guarded_receive():
            if state["done"]:
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within "
                               f"{self.limits.read_timeout_s:g} s ({state['read']} of "
                               f"{declared if declared is not None else 'a chunked body of ?'} "
                               "bytes came); send the whole body at once",
                               code="request_timeout") from None
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.limits.max_body_bytes:
                    raise APIError(413, _too_large(state["read"], self.limits, streamed=True),
                                   code="body_too_large")
                if not message.get("more_body", False):
                    state["done"] = True
            else:
                state["done"] = True
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except APIError as err:  # raised in a route that has no handler for it
            if state["started"]:
                raise
            await send_error(send, err.status, err.message, err.code, err.headers)


class KeyCheck:
    """ASGI middleware for the API keys: ``/v1/*`` always needs one, ``/metrics`` unless
    public; ``/health`` answers without one, but only with its status (the app reads
    ``scope["state"]["authenticated"]``). Only the keys' digests are kept, and every one is
    compared, in constant time, whatever matches."""

    def __init__(self, app, api_keys: tuple[str, ...], metrics_public: bool = False) -> None:
        self.app, self.metrics_public = app, metrics_public
        self._keys = [_digest(k) for k in api_keys]

    def verdict(self, headers: list[tuple[bytes, bytes]]) -> bool | None:
        """True: a valid key; False: a wrong one; None: none sent."""
        sent = None
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").strip().partition(" ")
                if scheme.lower() == "bearer":
                    sent = token.strip()
        if sent is None:
            return None
        digest = _digest(sent)
        ok = False
        for key in self._keys:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(digest, key)
        return ok

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        verdict = self.verdict(scope["headers"])
        scope.setdefault("state", {})["authenticated"] = bool(verdict)
        path = scope["path"]
        protected = path == "/v1" or path.startswith("/v1/") or (
            path == "/metrics" and not self.metrics_public)
        if protected and not verdict:
            why = ("this server needs an API key: send the header 'Authorization: Bearer KEY' "
                   "(a key given to adp serve --api-key or ADP_API_KEY)" if verdict is None
                   else "the API key sent is not valid for this server (compare it with adp "
                   "serve's --api-key / ADP_API_KEY)")
            return await send_error(send, 401, why, "invalid_api_key",
                                    {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class Cors:
    """Cross-origin calls from the web pages in ``origins`` (``*``: any). A preflight from one of
    them is answered here (before the keys: a preflight carries none); one from another page
    gets 403, so its browser sends nothing. Answers to the listed pages carry
    ``Access-Control-Allow-Origin``; without it a browser hides the answer from the page."""

    METHODS = "GET, POST"
    HEADERS = "authorization, content-type"

    def __init__(self, app, origins: tuple[str, ...], max_age_s: int = 600) -> None:
        self.app, self.any = app, "*" in origins
        self.origins = {o.lower() for o in origins}
        self.max_age = str(max_age_s)

    async def __call__(self, scope, receive, send) -> None:
        origin = next((v.decode("latin-1") for n, v in scope.get("headers", ())
                       if n == b"origin"), None)
        if scope["type"] != "http" or origin is None:
            return await self.app(scope, receive, send)
        allowed = self.any or origin.lower() in self.origins
        preflight = scope["method"] == "OPTIONS" and any(
            n == b"access-control-request-method" for n, _ in scope["headers"])
        if preflight:
            if not allowed:
                return await send_error(send, 403, f"the origin {json.dumps(origin[:100])} may "
                                        "not call this server from a browser; adp serve "
                                        "--allowed-origins lists the pages that may",
                                        "origin_not_allowed")
            await send({"type": "http.response.start", "status": 204, "headers": [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-methods", self.METHODS.encode()),
                (b"access-control-allow-headers", self.HEADERS.encode()),
                (b"access-control-max-age", self.max_age.encode()), (b"vary", b"origin")]})
            return await send({"type": "http.response.body", "body": b""})
        if not allowed:
            return await self.app(scope, receive, send)

        async def with_cors(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[
                    *message.get("headers", []),
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"vary", b"origin")])
            await send(message)

        await self.app(scope, receive, with_cors)


def _too_large(size: int, limits: HTTPLimits, streamed: bool = False) -> str:
    got = f"over {size >> 20} MiB came" if streamed else f"the request body is {size >> 20} MiB"
    return (f"{got}; at most {limits.max_body_bytes >> 20} MiB are accepted (a prompt longer "
            "than any context): shorten it")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
