"""An OpenAI-compatible HTTP server for the chat model, with a small chat page and a feedback log.

    python serve.py --http                                     # the shipped adapter; http://127.0.0.1:8000
    python serve.py --http --adapter runs/r8/best_adapter      # another adapter (--base-only: none)

Endpoints: POST /v1/chat/completions (streaming or not), GET /v1/models, POST /v1/feedback,
GET /health, GET / (the chat page in medlora/web/).

One model, one owner: the worker thread in medlora/worker.py holds the model and takes requests
from a queue (one at a time by default; --max-batch N decodes waiting greedy requests together).
This side never touches the model: it parses and checks requests, tokenizes them, and relays
the worker's text pieces to the client.

Safety: every conversation is rendered under MEDICAL_SYSTEM_PROMPT via `with_safety_prompt`,
the same template training uses; a client's system message is added after it, never instead.

Left out: tools/function calls, n > 1, logprobs, JSON mode, logit bias, presence/frequency penalties
(the server's --repetition-penalty applies to every request), CORS, and continuous batching (a
request that arrives mid-batch waits for it). A request that asks for one of them, or sends a
field OpenAI does not define, gets a 400 naming it, as OpenAI answers unknown fields: a silently
ignored setting would be a wrong answer.

Browsers: POST bodies must be `Content-Type: application/json`, so a web page the user visits cannot
make the server write training examples into its feedback log (a text/plain POST needs no CORS
preflight; a JSON one does, and there is none); and bound to loopback, the server answers only Host
names of this machine (127.0.0.1, localhost, ::1, plus --allowed-host), against DNS rebinding.

Mirrors OpenAI's Chat Completions API (the request and SSE stream shapes the `openai` client
expects, which vLLM's and llama.cpp's servers also speak).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .tokenizer import ChatFormatError, ChatTokenizer, with_safety_prompt
from .worker import Engine, Job

WEB_DIR = Path(__file__).resolve().parent / "web"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4  # OpenAI's limit
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SEED_RANGE = (-2 ** 63, 2 ** 63 - 1)  # OpenAI's (int64)
# Chat Completions fields this server reads, and those it accepts because they change nothing here.
FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
          "stream", "stream_options", "n", "ignore_eos"}
NO_EFFECT = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
             "safety_identifier"}
# Features this server does not have: accepted only at the value that asks for nothing.
UNSUPPORTED = {"tools": lambda v: v in (None, []), "tool_choice": lambda v: v in (None, "none"),
               "functions": lambda v: v in (None, []), "function_call": lambda v: v in (None, "none"),
               "logprobs": lambda v: v in (None, False), "top_logprobs": lambda v: v in (None, 0),
               "response_format": lambda v: v is None or v == {"type": "text"},
               "logit_bias": lambda v: v in (None, {}), "presence_penalty": lambda v: v in (None, 0),
               "frequency_penalty": lambda v: v in (None, 0), "modalities": lambda v: v in (None, ["text"]),
               "audio": lambda v: v is None, "prediction": lambda v: v is None,
               "reasoning_effort": lambda v: v is None, "web_search_options": lambda v: v is None,
               "verbosity": lambda v: v in (None, "medium")}


# ---------------------------------------------------------------------------------------------
# Settings and errors
# ---------------------------------------------------------------------------------------------
@dataclass
class Settings:
    model_id: str = "medlora"
    base_model: str = ""
    adapter: str | None = None
    api_key: str | None = None
    feedback_file: str = "feedback.jsonl"
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_body_bytes: int = 1_000_000
    max_batch: int = 1  # >1 trades exact reproducibility for throughput (medlora/worker.py)
    temperature: float = 0.0  # defaults for requests that leave them out
    top_p: float = 1.0
    top_k: int = 0  # server-wide (not in the OpenAI API)
    repetition_penalty: float = 1.0  # server-wide
    no_repeat_ngram: int = 0  # server-wide
    no_repeat_keeps_numbers: bool = True  # server-wide: the no-repeat rule never changes a digit (generate.NgramBan)
    seed: int | None = None  # for requests that send none (serve.py --seed): sampled answers reproducible
    max_queue: int = 64  # requests waiting or running; more get 429 (a client retries later)
    allowed_hosts: frozenset[str] | None = LOOPBACK  # Host header names accepted (None: any; serve.py)


class ApiError(Exception):
    """An error the client caused (or may retry), sent in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# Request parsing: plain checks, so every bad field gets a 400 that names it
# ---------------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    messages: list[dict]
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def parse_messages(raw: Any, param: str = "messages") -> list[dict]:
    """OpenAI messages -> [{"role", "content"}] with our three roles; text parts are joined."""
    if not isinstance(raw, list):
        raise ApiError(400, f"'{param}' must be a list of messages", param, "invalid_type")
    if not raw:
        raise ApiError(400, f"'{param}' must not be empty", param, "empty_array")
    out = []
    for i, m in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role: {str(role)[:40]!r} is not supported (use system, user or assistant)",
                           f"{where}.role", "invalid_value")
        content = m.get("content")
        if role == "assistant" and m.get("tool_calls"):
            raise ApiError(400, f"{where}.tool_calls: tools are not supported", f"{where}.tool_calls", "invalid_value")
        if role == "assistant" and content is None:  # OpenAI allows it (an assistant turn that only called tools)
            content = ""
        if isinstance(content, list):  # [{"type": "text", "text": "..."}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", f"{where}.content", "invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append({"role": ROLES[role], "content": content})
    return out


def parse_chat_request(body: Any, settings: Settings) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")
    for name, value in body.items():
        if name in UNSUPPORTED and not UNSUPPORTED[name](value):
            raise ApiError(400, f"'{name}' is not supported by this server (no tools, logprobs, JSON mode, logit "
                                "bias or penalties other than its own --repetition-penalty)", name, "unsupported_parameter")
        if name not in FIELDS | NO_EFFECT | set(UNSUPPORTED):
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
    messages = parse_messages(body.get("messages"))

    model = body.get("model", settings.model_id)
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    check_model(model, settings)

    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is None:
        max_tokens = settings.default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(400, f"'{param}' must be an integer >= 1", param, "invalid_value")
    elif max_tokens > settings.max_tokens_limit:
        raise ApiError(400, f"'{param}' is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
                       param, "invalid_value")

    def number(name: str, default: float, ok, rule: str) -> float:
        v = body.get(name)
        if v is None:
            return default
        if not _is_number(v) or not ok(v):
            raise ApiError(400, f"'{name}' must be a number {rule}, got {str(v)[:40]}", name, "invalid_value")
        return float(v)

    temperature = number("temperature", settings.temperature, lambda v: 0 <= v <= 2, "in [0, 2]")
    top_p = number("top_p", settings.top_p, lambda v: 0 <= v <= 1, "in [0, 1]")

    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, "'seed' must be an integer", "seed", "invalid_type")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError(400, f"'seed' must be a 64-bit signed integer, got {str(seed)[:40]}", "seed", "invalid_value")
    seed = settings.seed if seed is None else seed

    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop", "invalid_value")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream", "invalid_type")
    opts = body.get("stream_options")
    if opts is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
    opts = opts or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
        raise ApiError(400, "'stream_options' takes 'include_usage' and 'include_obfuscation'", "stream_options",
                       "invalid_value")
    for key in opts:  # include_obfuscation: OpenAI's padding against length side channels; none is sent here
        if not isinstance(opts[key], bool):
            raise ApiError(400, f"'stream_options.{key}' must be true or false", f"stream_options.{key}", "invalid_type")
    n = body.get("n")
    if n is not None and not (_is_int(n) and n == 1):
        raise ApiError(400, "only n=1 is supported", "n", "invalid_value")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: keep going past end-of-turn
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", "ignore_eos", "invalid_type")

    return ChatRequest(messages, model, max_tokens, temperature, top_p, seed, stop, stream,
                       opts.get("include_usage", False), ignore_eos)


def check_model(model: str, settings: Settings) -> None:
    """OpenAI's 404 for a model name this server does not serve (not an answer under that name)."""
    if model != settings.model_id:
        raise ApiError(404, f"The model '{model[:80]}' does not exist; this server serves '{settings.model_id}'",
                       "model", "model_not_found")


def check_control_tokens(tok: ChatTokenizer, messages: list[dict]) -> None:
    """400 for message text holding a special token of the tokenizer (<|im_end|>, <|im_start|>, ...): it
    would be read as the token itself, ending the message and opening a turn of its own."""
    for i, m in enumerate(messages):
        found = tok.control_token_in(m["content"])
        if found:
            raise ApiError(400, f"messages[{i}].content contains {found!r}, a special token of the tokenizer, "
                                "which would be read as that token; remove it", f"messages[{i}].content", "invalid_value")


def encode_prompt(tok: ChatTokenizer, messages: list[dict], settings: Settings) -> list[int]:
    """The prompt ids, always under the safe system prompt, with the training template."""
    check_control_tokens(tok, messages)
    try:
        ids = tok.encode_chat(with_safety_prompt(messages), add_generation_prompt=True)
    except ChatFormatError as e:
        raise ApiError(400, f"messages: {e}", "messages", "invalid_value") from None
    if len(ids) > settings.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {len(ids)} tokens (with the system prompt); this server allows "
                            f"at most {settings.max_prompt_tokens}", "messages", "context_length_exceeded")
    return ids


# ---------------------------------------------------------------------------------------------
# Feedback log
# ---------------------------------------------------------------------------------------------
class FeedbackLog:
    """Appends one JSON line per record: under a lock, one unbuffered write(2) and an fsync per
    record, so records from concurrent requests never interleave and an acknowledged one is on disk."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # a torn last line (crash, full disk) must not swallow this one
                view = memoryview(data)
                while view:  # one write(2) in practice; looped only because POSIX allows short writes
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)


def feedback_problem(path: str | os.PathLike) -> str | None:
    """Why records could not be appended to `path`, found at startup: else the first feedback POST
    would be a 500 (FeedbackLog.append creates missing folders, so those are fine)."""
    p = Path(path).absolute()
    if p.is_dir():
        return "is a folder, not a file"
    if p.exists():
        return None if os.access(p, os.W_OK) else "is not writable"
    folder = next(a for a in p.parents if a.exists())
    if not folder.is_dir():
        return f"{folder} is not a folder"
    return None if os.access(folder, os.W_OK | os.X_OK) else f"cannot create it: {folder} is not writable"


def listen(host: str, port: int) -> socket.socket:
    """Bind the server's socket before saying it serves: a taken port is one clear error."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart while old sockets linger
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def feedback_record(body: Any, model_id: str) -> dict:
    """Check a feedback request and build its line: a `{"messages": [...]}` record that
    `train.py --extra-data` reads, whose last assistant message is the correction if one was
    given (that is the training example), plus metadata train.py ignores."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")
    unknown = sorted(set(body) - {"messages", "rating", "correction"})
    if unknown:  # as for chat requests: a misspelt field is an error, not silently dropped
        raise ApiError(400, f"unknown field '{unknown[0]}' (feedback takes messages, rating, correction)",
                       unknown[0], "invalid_value")
    messages = parse_messages(body.get("messages"))
    if messages[-1]["role"] != "assistant":
        raise ApiError(400, "the last message must be the assistant's answer being rated", "messages", "invalid_value")
    if not any(m["role"] == "user" for m in messages):
        raise ApiError(400, "the conversation has no user message", "messages", "invalid_value")
    rating = body.get("rating")
    if rating not in ("bad", "good"):
        raise ApiError(400, "'rating' must be \"bad\" or \"good\"", "rating", "invalid_value")
    correction = body.get("correction")
    if correction is not None and not isinstance(correction, str):
        raise ApiError(400, "'correction' must be a string", "correction", "invalid_type")
    correction = (correction or "").strip() or None  # a blank box is no correction
    if correction and rating == "good":
        raise ApiError(400, "a correction goes with rating \"bad\" (a good answer needs none)", "correction",
                       "invalid_value")
    original = messages[-1]["content"]
    if correction:
        messages[-1] = {"role": "assistant", "content": correction}
    if rating == "good" and not messages[-1]["content"].strip():  # as a training example: "answer nothing"
        raise ApiError(400, "an empty answer cannot be rated good (it would teach the model to say nothing)",
                       "messages", "invalid_value")
    return {"messages": messages, "rating": rating, "correction": correction, "original_answer": original,
            "model": model_id, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes before reading them all. Only a JSON content
    type: a web page elsewhere can send a text/plain POST to 127.0.0.1 without asking, but a JSON one
    needs a CORS preflight, which this server never grants."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the request body must be sent as 'Content-Type: application/json' (got "
                            f"{kind[:60] or 'none'!r})", None, "unsupported_media_type")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {length} bytes; this server accepts at most {limit}",
                       None, "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", None, "request_too_large")
    try:
        obj = json.loads(body)
        # JSON may spell lone surrogates (\ud800), which are no text: the tokenizer, error messages
        # and the feedback file would fail on them later as a 500.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return obj
    except UnicodeEncodeError:
        raise ApiError(400, "the request body holds an invalid Unicode escape (a lone surrogate such as "
                            "\\ud800)", None, "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", None, "invalid_json") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:120]})", None, "invalid_json") from None


def chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None,
          with_usage: bool = False) -> str:
    """One SSE chunk; with stream_options.include_usage every chunk but the last has "usage": null."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **({"usage": None} if with_usage else {})}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def job_events(job: Job, request: Request, engine: Engine) -> AsyncIterator[tuple]:
    """The worker's events for `job`; flags the job cancelled if the client goes away (checked
    between events), or if whoever iterates this stops early (e.g. the stream's send failed)."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            yield event
            if event[0] in ("done", "error"):
                return
            if await request.is_disconnected():
                return
    finally:
        engine.cancel(job)  # no-op once the job is finished


def create_app(engine: Engine, settings: Settings):
    """The FastAPI app around a running Engine."""
    app = FastAPI(title="medlora", docs_url=None, redoc_url=None, openapi_url=None)
    feedback = FeedbackLog(settings.feedback_file)
    tok = engine.tok
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return await _api_error(request, ApiError(exc.status_code, str(exc.detail), None,
                                                  "not_found" if exc.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return await _api_error(request, ApiError(400, str(exc)[:300], None, "invalid_value"))

    @app.exception_handler(Exception)
    async def _server_error(request, exc):
        print(f"[medlora] internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return await _api_error(request, ApiError(500, f"internal error: {type(exc).__name__}", None, None, "server_error"))

    def auth(request: Request) -> None:
        # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 is same-origin to the
        # browser, so nothing stops its requests but the Host header it must send (evil.example).
        host = urlsplit("//" + request.headers.get("host", "")).hostname
        if settings.allowed_hosts is not None and host not in settings.allowed_hosts:
            raise ApiError(403, f"Host {str(host)[:80]!r} is not served here (serve.py --allowed-host NAME adds a "
                                "name, e.g. behind a proxy that passes the original Host)", None, "host_not_allowed")
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "incorrect API key", None, "invalid_api_key")

    guarded = [Depends(auth)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, **engine.snapshot()}

    card = {"id": settings.model_id, "object": "model", "created": started, "owned_by": "medlora",
            "base_model": settings.base_model, "adapter": Path(settings.adapter).name if settings.adapter else None}

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def model(model: str):
        check_model(model, settings)
        return card

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(request: Request):
        if not engine.reserve(settings.max_queue):  # before reading and tokenising the request
            raise ApiError(429, f"the server is busy ({settings.max_queue} requests waiting or running); retry later",
                           None, "rate_limit_exceeded", "requests")
        try:
            req = parse_chat_request(await read_json(request, settings.max_body_bytes), settings)
            prompt = encode_prompt(tok, req.messages, settings)
            job = Job(prompt, req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, req.ignore_eos,
                      asyncio.get_running_loop())
        except BaseException:  # a bad request (or the client gone while sending it) gives its place back
            engine.release()
            raise
        engine.submit(job, reserved=True)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(sse(job, request, req, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces, done = [], None
        async with aclosing(job_events(job, request, engine)) as events:
            async for event in events:
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    raise ApiError(500, event[1], None, None, "server_error")
                else:
                    done = event
        if done is None or done[1] == "cancelled":
            return JSONResponse({}, status_code=499)  # the client has gone; nobody reads this
        _, reason, n_prompt, n_completion = done
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "logprobs": None, "finish_reason": reason}],
                "usage": usage(n_prompt, n_completion)}

    async def sse(job: Job, request: Request, req: ChatRequest, cid: str, created: int):
        """OpenAI's chunks: the role, content deltas, the finish reason, [usage,] [DONE]."""
        try:
            u = req.include_usage
            yield chunk(cid, created, req.model, {"role": "assistant", "content": ""}, with_usage=u)
            async with aclosing(job_events(job, request, engine)) as events:
                async for event in events:
                    if event[0] == "text":
                        yield chunk(cid, created, req.model, {"content": event[1]}, with_usage=u)
                    elif event[0] == "error":
                        yield f"data: {json.dumps(ApiError(500, event[1], None, None, 'server_error').body())}\n\n"
                    elif event[1] != "cancelled":
                        _, reason, n_prompt, n_completion = event
                        yield chunk(cid, created, req.model, {}, reason, with_usage=u)
                        if req.include_usage:
                            body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": req.model, "choices": [], "usage": usage(n_prompt, n_completion)}
                            yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(job)  # the client went away mid-stream: stop generating for it

    @app.post("/v1/feedback", dependencies=guarded)
    async def post_feedback(request: Request):
        record = feedback_record(await read_json(request, settings.max_body_bytes), settings.model_id)
        check_control_tokens(tok, record["messages"])  # a training example: its text must be plain text
        await asyncio.to_thread(feedback.append, record)
        return {"status": "saved", "object": "feedback"}

    @app.get("/", include_in_schema=False)
    async def page():
        # The page is public static markup (no data); it asks for the API key when the API needs one.
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = WEB_DIR / name
        if name not in {"app.js", "style.css"} or not path.is_file():
            raise ApiError(404, f"no such file: {name}", None, "not_found")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    return app


def serve(model, tok: ChatTokenizer, settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until Ctrl-C / SIGTERM."""
    import uvicorn

    limit = model.config.max_position_embeddings
    if settings.max_prompt_tokens + settings.max_tokens_limit > limit:
        raise SystemExit(f"error: --max-prompt-tokens + --max-tokens-limit must fit the model's context of {limit} tokens")
    problem = feedback_problem(settings.feedback_file)
    if problem:
        raise SystemExit(f"error: --feedback-file {settings.feedback_file}: {problem}")
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"[medlora] warning: serving on {host} with no API key: anyone who can reach this port can use it",
              file=sys.stderr)
    sock = listen(host, port)
    engine = Engine(model, tok, settings.max_batch, settings.top_k, settings.repetition_penalty,
                    settings.no_repeat_ngram, settings.no_repeat_keeps_numbers)
    app = create_app(engine, settings)
    print(f"[medlora] serving {settings.model_id} on http://{host}:{sock.getsockname()[1]} (API key "
          f"{'required' if settings.api_key else 'off'}; feedback -> {settings.feedback_file})", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # as uvicorn.run
        pass
    finally:
        engine.close()
        sock.close()
