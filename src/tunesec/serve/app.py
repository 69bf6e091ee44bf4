"""The FastAPI app: OpenAI-compatible routes with every control of :class:`ServeState` applied in order.

A chat request passes: authentication (401) -> per-key rate limit (429) -> body size (413) -> JSON and
parameters (400) -> model name (404) -> message and token limits (400) -> server-side system prompts -> input
guard -> backend -> secret-leak filter and output guard (streams: per window, cut with a refusal on failure)
-> audit line and metrics. A blocked request is answered with the configured refusal and ``finish_reason``
``content_filter``; guards fail closed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tunesec.serve.audit import AuditLog, text_hash
from tunesec.serve.auth import KeyStore, RateLimiter, bearer
from tunesec.serve.backend import Backend, BackendError, Sampling
from tunesec.serve.config import ServeConfig
from tunesec.serve.guards import Guard, GuardError, PromptPolicy
from tunesec.serve.metrics import ServeMetrics
from tunesec.serve.protocol import ApiError, ChatRequest, chunk_body, completion_body, parse_request


@dataclass
class ServeState:
    """Everything one server enforces (built by :func:`tunesec.serve.server.build_state` or by tests)."""

    config: ServeConfig
    backend: Backend
    served_name: str
    policy: PromptPolicy
    audit: AuditLog
    keys: KeyStore | None = None  # None: open (no keys, loopback only)
    input_guard: Guard | None = None
    output_guard: Guard | None = None
    limiter: RateLimiter = field(init=False)
    metrics: ServeMetrics = field(init=False)

    def __post_init__(self) -> None:
        rl = self.config.auth.rate_limit
        self.limiter = RateLimiter(rl.requests_per_minute, rl.burst)
        self.metrics = ServeMetrics(lambda: float(self.backend.queue_depth()))
        if hasattr(self.backend, "on_batch"):
            self.backend.on_batch = self.metrics.on_batch


@dataclass
class _Trace:
    """What one request's audit line reports."""

    rid: str
    t0: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    stream: bool = False
    status: int = 200
    decision: str = "allowed"
    reason: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    prompt: str | None = None
    answer: str | None = None
    withheld: str | None = None  # the model's answer an output guard blocked (never a secret leak)
    tokens: dict[str, int] = field(default_factory=dict)

    def block(self, reason: str) -> None:
        self.decision, self.reason = "blocked", reason


def create_app(state: ServeState) -> FastAPI:
    """The app over ``state``; the caller owns ``state`` (closing the backend and the audit log)."""
    app = FastAPI(title="tunesec serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(404)
    async def _not_found(request: Request, _: Exception) -> JSONResponse:
        return _error_response(ApiError(404, f"Unknown route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, _: Exception) -> JSONResponse:
        return _error_response(ApiError(405, f"Method {request.method} not allowed on {request.url.path}"))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": state.served_name, "queue_depth": state.backend.queue_depth()}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authenticate(state, request, _Trace(rid=""))
        return {"object": "list", "data": [{"id": state.served_name, "object": "model", "owned_by": "tunesec"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        trace = _Trace(rid="chatcmpl-" + secrets.token_hex(12))
        try:
            return await _chat(state, request, trace)
        except ApiError as err:
            trace.status, trace.decision = err.status, "rejected"
            trace.reason = trace.reason or (err.code or err.type)
            _finish(state, trace)
            return _error_response(err)

    return app


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": err.param} if err.status == 429 and err.param else None
    body = err.body()
    if err.status == 429:
        body["error"]["param"] = None
    return JSONResponse(body, status_code=err.status, headers=headers)


def _authenticate(state: ServeState, request: Request, trace: _Trace) -> None:
    if state.keys is None:
        return
    token = bearer(request.headers.get("authorization"))
    record = state.keys.check(token) if token else None
    if record is None:
        # The message never repeats the presented key (OpenAI's shows a fragment; a log of it would leak it).
        msg = "Missing API key" if token is None else "Incorrect or revoked API key"
        raise ApiError(401, msg, "authentication_error", code="invalid_api_key")
    trace.key_id = record.id
    ok, wait = state.limiter.allow(record.id)
    if not ok:
        raise ApiError(429, "Rate limit reached for this key", "rate_limit_error", f"{wait:.0f}", "rate_limit_exceeded")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"Request body of {declared} bytes exceeds the limit of {limit}", code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_limits(state: ServeState, req: ChatRequest, chat: list[dict[str, str]]) -> Sampling:
    lim = state.config.limits
    if len(req.messages) > lim.max_messages:
        raise ApiError(400, f"{len(req.messages)} messages; at most {lim.max_messages}", param="messages")
    chars = sum(len(m["content"]) for m in chat)
    if chars > lim.max_prompt_chars:
        raise ApiError(
            400, f"Prompt of {chars} characters exceeds {lim.max_prompt_chars}", param="messages",
            code="context_length_exceeded",
        )  # fmt: skip
    asked = req.max_completion_tokens or req.max_tokens
    max_tokens = asked or lim.default_max_tokens
    if max_tokens > lim.max_tokens:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param} is {max_tokens}; at most {lim.max_tokens}", param=param)
    tokens = state.backend.count_tokens(chat)
    if tokens is not None and tokens > lim.max_prompt_tokens:
        raise ApiError(
            400, f"Prompt of {tokens} tokens exceeds {lim.max_prompt_tokens}", param="messages",
            code="context_length_exceeded",
        )  # fmt: skip
    temp = req.temperature if req.temperature is not None else state.config.default_temperature
    return Sampling(max_tokens=max_tokens, temperature=temp, top_p=req.top_p or 1.0, seed=req.seed)


async def _chat(state: ServeState, request: Request, trace: _Trace) -> Response:
    _authenticate(state, request, trace)
    raw = await _read_body(request, state.config.limits.max_body_bytes)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "Request body is not valid JSON", code="invalid_json") from None
    req = parse_request(data)
    trace.stream = req.stream
    if req.model != state.served_name:
        raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{state.served_name}'",
                       param="model", code="model_not_found")  # fmt: skip
    client = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    users = [m["content"] for m in client if m["role"] == "user"]
    trace.prompt = users[-1] if users else ""
    try:
        chat = state.policy.messages(client)
    except GuardError as err:
        raise ApiError(400, str(err), param="messages", code="system_message_not_allowed") from None
    sampling = _check_limits(state, req, chat)
    if state.input_guard is not None:
        decision = await state.input_guard.check_request(trace.prompt)
        trace.scores["input"] = decision.score
        if not decision.allowed:
            trace.block(decision.reason or "input_guard")
            return _refusal(state, req, trace)
    if req.stream:
        return StreamingResponse(_stream(state, req, chat, sampling, trace), media_type="text/event-stream")
    try:
        done = await state.backend.complete(chat, sampling)
    except BackendError as err:
        raise ApiError(502, f"Backend error: {err}", "server_error", code="backend_error") from None
    text, finish = _apply_stops(done.text, req.stops(), done.finish_reason)
    trace.tokens = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}
    if not await _answer_ok(state, trace, text):
        return _refusal(state, req, trace)
    trace.answer = text
    _finish(state, trace)
    return JSONResponse(completion_body(trace.rid, state.served_name, text, finish, trace.tokens))


def _apply_stops(text: str, stops: list[str], finish: str) -> tuple[str, str]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, finish)


async def _answer_ok(state: ServeState, trace: _Trace, text: str) -> bool:
    """Secret-leak filter, then the output guard, on the answer so far; records the block on failure."""
    if state.policy.leaks(text):
        trace.block("secret_leak")
        return False
    if state.output_guard is not None and text.strip():
        decision = await state.output_guard.check(trace.prompt or "", text)
        trace.scores["output"] = decision.score
        if not decision.allowed:
            trace.block(decision.reason or "output_guard")
            trace.withheld = text
            return False
    return True


def _refusal(state: ServeState, req: ChatRequest, trace: _Trace) -> Response:
    text = state.config.guards.refusal
    trace.answer = text
    _finish(state, trace)
    if req.stream:

        async def events() -> AsyncIterator[str]:
            yield _sse(chunk_body(trace.rid, state.served_name, {"role": "assistant", "content": text}))
            yield _sse(chunk_body(trace.rid, state.served_name, {}, "content_filter"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    # usage: what the model consumed and generated (nothing when a guard stopped the request before it)
    return JSONResponse(completion_body(trace.rid, state.served_name, text, "content_filter", trace.tokens))


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(
    state: ServeState, req: ChatRequest, chat: list[dict[str, str]], sampling: Sampling, trace: _Trace
) -> AsyncIterator[str]:
    """SSE events: text is released a window at a time, after the window passed the checks."""
    name, rid = state.served_name, trace.rid
    stops = req.stops()
    # Without an output check, deltas go out as they come; with one, a window at a time after it passed.
    checked = state.output_guard is not None or state.policy.holdback > 0
    window = state.config.guards.stream_window_chars if checked else 1
    hold = max([state.policy.holdback, *(len(s) - 1 for s in stops)])
    released, buffer, finish = "", "", "stop"
    try:
        yield _sse(chunk_body(rid, name, {"role": "assistant", "content": ""}))
        deltas = state.backend.stream(chat, sampling)
        ended = False
        while not ended:
            try:
                delta = await deltas.__anext__()
            except StopAsyncIteration:
                ended = True
                delta = ""
            buffer += delta
            cut = min((i for i in (buffer.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                buffer, ended = buffer[:cut], True
            while buffer and (ended or len(buffer) - hold >= window):
                take = len(buffer) if ended else min(window, len(buffer) - hold)
                piece = buffer[:take]
                if not await _answer_ok(state, trace, released + buffer):
                    trace.answer = released
                    yield _sse(chunk_body(rid, name, {"content": "\n\n" + state.config.guards.refusal}))
                    yield _sse(chunk_body(rid, name, {}, "content_filter"))
                    yield "data: [DONE]\n\n"
                    return
                released += piece
                buffer = buffer[take:]
                yield _sse(chunk_body(rid, name, {"content": piece}))
        trace.answer = released
        yield _sse(chunk_body(rid, name, {}, finish))
        yield "data: [DONE]\n\n"
    except BackendError as err:
        trace.status, trace.decision, trace.reason, trace.answer = 502, "error", "backend_error", released
        err_body = ApiError(502, f"Backend error: {err}", "server_error", code="backend_error").body()
        yield f"data: {json.dumps(err_body)}\n\n"
    except asyncio.CancelledError:
        trace.decision, trace.reason, trace.answer = "client_closed", "client_closed", released
        raise
    finally:
        _finish(state, trace)


def _finish(state: ServeState, trace: _Trace) -> None:
    """Write the audit line and count the request (once per request)."""
    seconds = time.perf_counter() - trace.t0
    record: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "id": trace.rid,
        "key_id": trace.key_id,
        "model": state.served_name,
        "stream": trace.stream,
        "status": trace.status,
        "decision": trace.decision,
        "reason": trace.reason,
        "scores": trace.scores,
        "latency_s": round(seconds, 4),
        "prompt_sha256": text_hash(trace.prompt) if trace.prompt is not None else None,
        "answer_sha256": text_hash(trace.answer) if trace.answer is not None else None,
        **trace.tokens,
    }
    if trace.withheld is not None:
        record["withheld_sha256"] = text_hash(trace.withheld)
    if state.config.audit.raw_text:
        record["prompt"], record["answer"] = trace.prompt, trace.answer
        if trace.withheld is not None:
            record["withheld"] = trace.withheld
    state.audit.write(record)
    blocked = trace.reason if trace.decision == "blocked" or trace.status in (401, 429, 413) else None
    state.metrics.observe(trace.status, seconds, blocked)
