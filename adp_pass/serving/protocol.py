"""The OpenAI API's request checks and error format (``/v1/completions``,
``/v1/chat/completions``).

Every bad request becomes an :class:`APIError`: an HTTP 4xx with the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` whose message names the field, what was
wrong and what is accepted. Checks are done here, before a request reaches a rank, so a rank
never sees a request it cannot serve.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16
MAX_STOP_LEN = 256
MAX_BODY_BYTES = 8 << 20  # far above any context's text; a bigger body is a mistake or abuse
MAX_JSON_DEPTH = 32  # a chat request nests 5 deep; deeper is abuse (and costs recursion)
# Accepted at their no-op values (clients send the defaults); anything else is refused by name.
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": None, "top_logprobs": None,
            "logit_bias": None, "best_of": 1, "echo": False, "suffix": None, "tools": None,
            "tool_choice": None, "response_format": None, "functions": None,
            "function_call": None, "parallel_tool_calls": None}
_NEUTRAL_ALSO = {"logprobs": (False, 0), "response_format": ({"type": "text"},),
                 "tool_choice": ("none",), "suffix": ("",), "logit_bias": ({},),
                 "tools": ([],), "functions": ([],)}
# vLLM's sampling extensions: refused by name until the sampler implements them, accepted only at
# the values that mean "off" (what vLLM clients send by default).
_NOT_YET = {"top_k": ((-1, 0), "-1 or 0 (off)"), "min_p": ((0,), "0 (off)"),
            "repetition_penalty": ((1,), "1.0 (off)"),
            "stop_token_ids": (([],), "[] (none); use 'stop' strings")}


class APIError(Exception):
    """An error answered in the OpenAI format."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ModelLimits:
    """What the served model and its ranks accept."""

    name: str
    vocab_size: int
    max_model_len: int  # prompt + generated tokens of one request
    kv_tokens: int  # one rank's KV cache, in tokens (a request must fit it whole)


@dataclass
class Generation:
    """One checked request: its prompts (token ids, one per choice group) and settings."""

    prompts: list[list[int]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def check_body_size(size: int) -> None:
    if size > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {size >> 20} MiB; at most "
                       f"{MAX_BODY_BYTES >> 20} MiB are accepted (a prompt longer than any "
                       "context): shorten it", code="body_too_large")


def check_content_type(value: str | None) -> None:
    """JSON routes take ``application/json`` only: a browser page may send other types to any
    server without asking first (a CORS "simple request"), so accepting them would let a web
    page drive a local server."""
    media, _, params = (value or "").partition(";")
    if media.strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got "
                       f"{json.dumps((value or '(none)')[:80])}; send the header "
                       "'Content-Type: application/json'", code="unsupported_media_type")
    for param in params.split(";"):
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and \
                charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise APIError(415, f"the body must be UTF-8 JSON, got charset "
                           f"{json.dumps(charset.strip()[:40])}; send UTF-8",
                           code="unsupported_media_type")


def parse_body(raw: bytes) -> dict:
    check_body_size(len(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad(f"the request body is not UTF-8 (byte {err.start}); JSON must be sent as "
                  "UTF-8", code="invalid_json") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise bad(f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; "
                  "send a flat request", code="invalid_json") from None
    except ValueError as err:  # JSONDecodeError, and an integer of over 4300 digits
        if not isinstance(err, json.JSONDecodeError):
            raise bad("the request body holds a number with thousands of digits; send numbers "
                      "of ordinary size", code="invalid_json") from None
        raise bad(f"the request body is not valid JSON ({err}); send a JSON object with "
                  "Content-Type: application/json", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got a JSON {_kind(body)}",
                  code="invalid_json")
    _check_tree(body)
    return body


def _check_tree(body: dict) -> None:
    """Depth, and strings that are not text: JSON may spell a lone UTF-16 surrogate
    (``"\\ud800"``), which no tokenizer and no JSON encoder takes. Walked without recursion."""
    stack: list[tuple[object, str, int]] = [(body, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} "
                      f"levels (at '{where[:60]}...'); send a flat request", code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else key
                if not _is_text(key):
                    raise bad(f"a key of '{where or 'the body'}' holds a lone UTF-16 surrogate "
                              "(\\ud800-\\udfff), which is not text; send valid Unicode",
                              where or None, code="invalid_unicode")
                stack.append((item, path, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and not _is_text(value):
            raise bad(f"'{where}' holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not "
                      "text; send valid Unicode", where, code="invalid_unicode")


def _is_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _int(body: dict, key: str, default, low: int | None = None, high: int | None = None,
         why_high: str = "") -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{key}' must be an integer, got {_kind(value)} {json.dumps(value)}", key)
    if low is not None and value < low:
        raise bad(f"'{key}' must be >= {low}, got {value}", key)
    if high is not None and value > high:
        raise bad(f"'{key}' must be <= {high}{why_high}, got {value}", key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{key}' must be a number, got {_kind(value)} {json.dumps(value)}", key)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"'{key}' must be in {interval}, got {value}", key)
    return float(value)


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be true or false, got {_kind(value)} {json.dumps(value)}", key)
    return value


def check_model(body: dict, limits: ModelLimits) -> None:
    model = body.get("model")
    if model is None:
        return  # as vLLM: the one served model
    if not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_kind(model)}", "model")
    if model != limits.name:
        raise APIError(404, f"the model '{model}' does not exist here; this server serves "
                       f"'{limits.name}' (GET /v1/models)", param="model",
                       code="model_not_found")


def _unsupported(body: dict) -> None:
    for key, neutral in _NEUTRAL.items():
        if key in body and body[key] != neutral and body[key] not in _NEUTRAL_ALSO.get(key, ()):
            raise bad(f"'{key}' is not supported by adp serve (got {json.dumps(body[key])[:80]}); "
                      "leave it out", key, code="unsupported_parameter")
    for key, (off, words) in _NOT_YET.items():
        value = body.get(key)
        if value is None:
            continue
        neutral = not isinstance(value, bool) and any(
            value == v and type(value) in ((int, float) if isinstance(v, int) else (type(v),))
            for v in off)
        if not neutral:
            raise bad(f"'{key}' is not supported by adp serve yet (got "
                      f"{json.dumps(value)[:80]}), and "
                      f"ignoring it would change your results silently; leave it out or send "
                      f"{words}", key, code="unsupported_parameter")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list):
        raise bad(f"'stop' must be a string or an array of strings, got {_kind(stop)}", "stop")
    if len(stop) > MAX_STOP:
        raise bad(f"'stop' has {len(stop)} sequences; at most {MAX_STOP} are allowed", "stop")
    for item in stop:
        if not isinstance(item, str):
            raise bad(f"'stop' must hold strings only, got {_kind(item)} {json.dumps(item)}",
                      "stop")
        if not item:
            raise bad("'stop' holds an empty string, which would stop at once; remove it", "stop")
        if len(item) > MAX_STOP_LEN:
            raise bad(f"a 'stop' sequence is {len(item)} characters; at most {MAX_STOP_LEN}",
                      "stop")
    return stop


def _settings(body: dict, limits: ModelLimits, prompts: list[list[int]],
              default_max_tokens: int | None, max_tokens_key: str = "max_tokens") -> Generation:
    _unsupported(body)
    longest = max(len(p) for p in prompts)
    room = min(limits.max_model_len, limits.kv_tokens) - longest
    if room < 1:
        raise bad(f"the prompt is {longest} tokens; this model's context is "
                  f"{min(limits.max_model_len, limits.kv_tokens)} tokens (prompt + completion), "
                  "so nothing can be generated: shorten the prompt", "prompt",
                  code="context_length_exceeded")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict):
            raise bad(f"'stream_options' must be an object, got {_kind(options)}",
                      "stream_options")
        include_usage = _bool(options, "include_usage", False)
    max_tokens = _int(body, max_tokens_key, None, low=1)
    if max_tokens is None and max_tokens_key != "max_tokens":
        max_tokens = _int(body, "max_tokens", None, low=1)
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    if max_tokens > room:
        raise bad(f"'{max_tokens_key}' is {max_tokens} but the prompt is {longest} tokens and the "
                  f"context {longest + room}: at most {room} tokens can be generated; lower "
                  f"'{max_tokens_key}' or shorten the prompt", max_tokens_key,
                  code="context_length_exceeded")
    return Generation(
        prompts=prompts, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        n=_int(body, "n", 1, low=1, high=MAX_N),
        stop=_stop(body), seed=_int(body, "seed", None), stream=stream,
        include_usage=include_usage, ignore_eos=_bool(body, "ignore_eos", False))


def _token_ids(ids: list, limits: ModelLimits, param: str) -> list[int]:
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise bad(f"'{param}' token ids must be integers, got {_kind(token)} "
                      f"{json.dumps(token)[:40]}", param)
        if not 0 <= token < limits.vocab_size:
            raise bad(f"'{param}' holds token id {token}, outside the vocabulary "
                      f"[0, {limits.vocab_size})", param, code="invalid_token_id")
    return list(ids)


def parse_completion(body: dict, limits: ModelLimits, tokenizer) -> Generation:
    """``/v1/completions``: ``prompt`` is a string, token ids, or an array of either."""
    check_model(body, limits)
    if "prompt" not in body:
        raise bad("'prompt' is required: a string, an array of token ids, or an array of those",
                  "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and not isinstance(prompt[0], (str, list))):
        prompt = [prompt]  # one prompt (text or ids)
    if not isinstance(prompt, list):
        raise bad(f"'prompt' must be a string, an array of token ids, or an array of those; got "
                  f"{_kind(prompt)}", "prompt")
    if not prompt:
        raise bad("'prompt' is empty; give at least one token or character", "prompt")
    if len(prompt) > MAX_N:
        raise bad(f"'prompt' is a batch of {len(prompt)}; at most {MAX_N} per request", "prompt")
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        elif isinstance(item, list):
            ids = _token_ids(item, limits, "prompt")
        else:
            raise bad(f"'prompt' entries must be strings or arrays of token ids, got "
                      f"{_kind(item)}", "prompt")
        if not ids:
            raise bad("'prompt' is empty; give at least one token or character", "prompt")
        prompts.append(ids)
    # OpenAI's completions default: 16 new tokens.
    return _settings(body, limits, prompts, default_max_tokens=16)


_ROLES = ("system", "user", "assistant", "developer", "tool")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required: an array of {role, content} objects", "messages")
    if not isinstance(messages, list):
        raise bad(f"'messages' must be an array, got {_kind(messages)}", "messages")
    if not messages:
        raise bad("'messages' is empty; give at least one message", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content', got "
                      f"{_kind(message)}", where)
        role = message.get("role")
        if role not in _ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(_ROLES)}, got "
                      f"{json.dumps(role)}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or \
                        not isinstance(part.get("text"), str):
                    raise bad(f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": "
                              "...}}: this server takes text only", f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string or an array of text parts, got "
                      f"{_kind(content)}", f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def parse_chat(body: dict, limits: ModelLimits, tokenizer) -> Generation:
    """``/v1/chat/completions``: ``messages`` through the chat template."""
    check_model(body, limits)
    messages = chat_messages(body)
    ids = tokenizer.chat_prompt(messages)
    if not ids:
        raise bad("the chat template made an empty prompt from 'messages'", "messages")
    _token_ids(ids, limits, "messages")
    # Chat has no OpenAI default length: up to the context, as vLLM.
    return _settings(body, limits, [ids], default_max_tokens=None,
                     max_tokens_key="max_completion_tokens"
                     if "max_completion_tokens" in body else "max_tokens")
