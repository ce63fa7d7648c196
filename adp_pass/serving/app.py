"""The HTTP API of ``adp serve``: an ASGI app (FastAPI) with the OpenAI routes.

``/v1/completions`` and ``/v1/chat/completions`` (JSON or SSE streams), ``/v1/models``,
``/health`` and ``/metrics``. Every error, from a malformed body to a dead rank, is answered in
the OpenAI error format; a client that disconnects cancels its request on the rank.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adp_pass.serving.protocol import (
    APIError, Generation, bad, check_body_size, check_content_type, parse_body, parse_chat,
    parse_completion)
from adp_pass.serving.state import Flight, RankLost, ServingState

DISCONNECT_POLL_S = 0.2


class TextStream:
    """Token ids -> text deltas, with the OpenAI ``stop`` strings applied: text that could still
    turn out to start a stop string is held back, and the text ends before the stop string.

    Decoding is incremental (as vLLM does): only a window of ids is decoded per token, the ids
    since ``prefix``, so a long completion costs linear, not quadratic, time. The window starts
    one chunk back, so tokenizers whose text depends on the previous token (leading spaces) see
    it; text ending in half a UTF-8 character waits for the next token."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded so far (what ids[:read] make)
        self.prefix = self.read = 0  # ids[prefix:read] decode to the end of self.text
        self.emitted = 0
        self.stopped = False

    def _decode(self, final: bool) -> None:
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read])
        window = self.tokenizer.decode(self.ids[self.prefix:])
        if final or (len(window) > len(seen) and not self._unfinished(window)):
            self.text += window[len(seen):]
            self.prefix, self.read = self.read, len(self.ids)

    def _unfinished(self, window: str) -> bool:
        """The window ends in half a UTF-8 character: wait for the next token. The tokenizer
        says so where it can tell (the byte tokenizer: a U+FFFD of an id above 255 is a whole
        character); otherwise a trailing U+FFFD waits, for at most 3 more tokens (a UTF-8
        character has at most 4 bytes), so a U+FFFD that is really there is not held to the end."""
        ask = getattr(self.tokenizer, "ends_mid_character", None)
        if ask is not None:
            return ask(self.ids[self.prefix:])
        return window.endswith("\ufffd") and len(self.ids) - self.read < 4

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids += ids
        self._decode(final)
        text = self.text
        hits = [i for i in (text.find(s, max(self.emitted - self.hold, 0)) for s in self.stop)
                if i >= 0]
        if hits:
            self.stopped, final, text = True, True, text[:min(hits)]
        end = len(text) if final else len(text) - self.hold
        if end <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:end], end
        return delta


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _lost(err: RankLost) -> APIError:
    """A request ended by the server's side (its rank died, the server stopped): 503, whose
    message says why and whether a retry can succeed."""
    return APIError(503, str(err), type="server_error", code="request_failed")


def build_app(state: ServingState) -> FastAPI:
    app = FastAPI(title="adp serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        what = {404: f"no route {request.url.path}; the routes are /v1/completions, "
                     "/v1/chat/completions, /v1/models, /health, /metrics",
                405: f"{request.method} is not allowed on {request.url.path}"}
        return _error_response(APIError(err.status_code, what.get(err.status_code, str(err.detail)),
                                        code="not_found" if err.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        return _error_response(APIError(400, f"bad request: {err.errors()}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return _error_response(APIError(500, f"internal error: {type(err).__name__}: {err} (a bug "
                                        "in adp serve: please report it with the server log)",
                                        type="server_error"))

    @app.get("/health")
    async def health(request: Request):
        status, body = state.health()
        if not request.scope.get("state", {}).get("authenticated", True):
            body = {"status": body["status"]}  # ranks, pids and hosts are for key holders
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": state.limits.name, "object": "model", "created": int(state.started),
                "owned_by": "adp-pass", "max_model_len": state.limits.max_model_len,
                "vocab_size": state.limits.vocab_size}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != state.limits.name:
            raise APIError(404, f"the model '{name}' does not exist here; this server serves "
                           f"'{state.limits.name}'", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await _read_body(request))
        gen = parse_completion(body, state.limits, state.tokenizer)
        _check_ever_fits(state, gen)
        return await _respond(request, state, gen, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await _read_body(request))
        gen = parse_chat(body, state.limits, state.tokenizer)
        _check_ever_fits(state, gen)
        return await _respond(request, state, gen, chat=True)

    return app


async def _read_body(request: Request) -> bytes:
    """The body of a JSON route: JSON only, refused unread when its declared length is already
    too big (the guard also counts it as it arrives, and times it)."""
    check_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        check_body_size(int(declared))
    try:
        return await request.body()
    except ClientDisconnect:  # gone, or cut off below the app for a broken body: nobody reads
        raise APIError(400, "the connection closed before the request body was complete",
                       code="incomplete_body") from None


def _check_ever_fits(state: ServingState, gen: Generation) -> None:
    """A request whose choices outnumber every queue together could only ever get 429, and
    clients retry 429 forever: refuse it for what it is. Each choice waits in a DP group's
    queue until its first token, so an idle server takes at most --max-queue per live group."""
    choices = len(gen.prompts) * gen.n
    live = sum(state.router.live)
    room = state.router.max_queue * live
    if live and choices > room:
        what = f"{len(gen.prompts)} prompts x n={gen.n}" if len(gen.prompts) > 1 else f"n={gen.n}"
        raise bad(f"this request has {choices} choices ({what}), but this server queues at most "
                  f"{room} ({state.router.max_queue} per DP group, --max-queue, x {live} live "
                  f"group{'s' * (live != 1)}), so it can never be accepted: lower 'n' or send "
                  "fewer prompts per request", "n", code="too_many_choices")


async def _respond(request: Request, state: ServingState, gen: Generation, chat: bool):
    flights = state.submit(gen)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{flights[0].request_id.split('-')[0]}"
    if gen.stream:
        return StreamingResponse(_stream(state, gen, flights, rid, chat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(request, state, gen, flights, rid, chat)


async def _run_choice(state: ServingState, flight: Flight, stream: TextStream, emit=None):
    """Drive one choice to its end; returns its finish reason. ``emit(text)`` gets each delta."""
    finish = None
    async for tokens, finish in state.tokens(flight):
        delta = stream.push(tokens, final=finish is not None)
        if delta and emit is not None:
            await emit(delta)
        if stream.stopped:
            state.cancel(flight, outcome="ok")
            return "stop"
    return "length" if finish in ("length", "max_position") else finish


async def _whole(request: Request, state: ServingState, gen: Generation, flights: list[Flight],
                 rid: str, chat: bool):
    streams = [TextStream(state.tokenizer, gen.stop) for _ in flights]
    texts = [[] for _ in flights]

    def collector(i):
        async def emit(delta):
            texts[i].append(delta)
        return emit

    runs = [asyncio.ensure_future(_run_choice(state, f, s, collector(i)))
            for i, (f, s) in enumerate(zip(flights, streams))]
    work = asyncio.gather(*runs)
    work.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, even when unread
    try:
        while True:  # a client that leaves cancels its request
            done, _ = await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                return JSONResponse({}, status_code=499)  # nobody reads it; finally cancels
        finishes = work.result()
    except RankLost as err:
        raise _lost(err) from None
    finally:
        for run in runs:  # one choice failed, or the client left: the others end too
            run.cancel()
        for flight in flights:
            state.cancel(flight)
    created = int(time.time())
    usage = _usage(flights)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)},
                    "logprobs": None, "finish_reason": f} for i, (t, f) in
                   enumerate(zip(texts, finishes))]
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": state.limits.name, "choices": choices, "usage": usage}
    choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": f}
               for i, (t, f) in enumerate(zip(texts, finishes))]
    return {"id": rid, "object": "text_completion", "created": created,
            "model": state.limits.name, "choices": choices, "usage": usage}


def _usage(flights: list[Flight]) -> dict:
    prompt = sum(f.prompt_len for f in flights)
    completion = sum(f.generated for f in flights)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def _stream(state: ServingState, gen: Generation, flights: list[Flight], rid: str,
                  chat: bool):
    """The SSE body: chunks of every choice as they come, then usage (if asked) and [DONE]. A
    client that disconnects ends this generator early: ``finally`` cancels what is left."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    queue: asyncio.Queue = asyncio.Queue()

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None,
                      "finish_reason": finish}
        return {"id": rid, "object": kind, "created": created, "model": state.limits.name,
                "choices": [choice]}

    async def drive(index: int, flight: Flight) -> None:
        async def emit(delta):
            await queue.put(chunk(index, delta, None))
        try:
            finish = await _run_choice(state, flight, TextStream(state.tokenizer, gen.stop), emit)
            await queue.put(chunk(index, None if chat else "", finish))
        except RankLost as err:
            await queue.put(_lost(err))

    tasks = []
    try:
        if chat:
            for i in range(len(flights)):
                yield _sse(chunk(i, None, None, role=True))
        tasks = [asyncio.ensure_future(drive(i, f)) for i, f in enumerate(flights)]
        left = len(flights)
        while left:
            item = await queue.get()
            if isinstance(item, APIError):
                yield _sse(item.body())  # the openai client raises it as an APIError
                return
            if item["choices"][0]["finish_reason"] is not None:
                left -= 1
            yield _sse(item)
        if gen.include_usage:
            yield _sse({"id": rid, "object": kind, "created": created,
                        "model": state.limits.name, "choices": [], "usage": _usage(flights)})
        yield b"data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for flight in flights:
            state.cancel(flight)
