"""ASGI middleware in front of every route: telemetry, API keys, admission control, body size.

Order, outermost first: telemetry (every request, refused or not, has a span, a metric and a log
line), keys (a stranger learns nothing, not even a limit), the key's own limits, admission (shed
load before reading bodies), body size.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hybrid_serve.agents import tracing
from hybrid_serve.config import APIKey
from hybrid_serve.deployments.errors import error_response, path_of
from hybrid_serve.deployments.metrics import metrics
from hybrid_serve.schemas import MIN_TIMEOUT_S, PRIORITIES, Priority

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class APIKeyMiddleware:
    """`Authorization: Bearer KEY` or `x-api-key: KEY` (the Anthropic SDK's header) on every
    route but health (where a valid key is still recognised); 401 that names no key. The key's
    label goes in the request's state for its limits, collections and usage."""

    def __init__(self, app: ASGIApp, keys: Callable[[], Sequence[APIKey | str]]) -> None:
        self.app = app
        self.keys = keys
        self._cache: tuple[tuple[APIKey, ...], list[tuple[bytes, str]]] = ((), [])

    def _configured(self) -> list[tuple[bytes, str]]:
        keys = tuple(APIKey(key=k) if isinstance(k, str) else k for k in self.keys())
        if keys != self._cache[0]:
            self._cache = (keys, [(k.digest(), k.label()) for k in keys])
        return self._cache[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        configured = self._configured() if scope["type"] == "http" else []
        if not configured:
            await self.app(scope, receive, send)
            return
        presented = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
            elif name == b"x-api-key" and not presented:
                presented = value.strip()
        digest = hashlib.sha256(presented).digest()
        # Constant time, and no early exit: every configured key is compared.
        label = None
        for d, name in configured:
            if hmac.compare_digest(digest, d):
                label = name
        authenticated = bool(presented) and label is not None
        if authenticated:
            scope.setdefault("state", {})["api_key"] = label
        if authenticated or path_of(scope) in OPEN_PATHS:
            # Health routes answer anyone; a valid key there unlocks their details.
            await self.app(scope, receive, send)
            return
        response = error_response(
            401,
            "missing or invalid API key; send Authorization: Bearer <key> or x-api-key: <key>",
            "invalid_api_key",
            {"WWW-Authenticate": "Bearer"},
            path_of(scope),
        )
        await response(scope, receive, send)


Admit = Callable[[str], Awaitable[dict[str, Any]]]


class KeyLimitMiddleware:
    """A key over its requests_per_minute gets 429 + Retry-After; a key over its daily Claude
    budget goes on, marked for answers from the SLM alone. `admit` asks the KeyLimits replica,
    so the limits hold over every orchestrator replica; when it cannot answer, requests pass
    (a limit is not worth an outage)."""

    def __init__(self, app: ASGIApp, admit: Callable[[], Admit | None]) -> None:
        self.app = app
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state") or {}
        admit = self.admit()
        label = state.get("api_key")
        if scope["type"] != "http" or label is None or admit is None:
            await self.app(scope, receive, send)
            return
        try:
            verdict = await admit(label)
        except Exception:
            logging.getLogger("ray.serve").warning("KeyLimits unreachable; request admitted")
            verdict = {"allowed": True}
        if not verdict.get("allowed", True):
            wait = max(1, math.ceil(verdict.get("retry_after_s", 1.0)))
            metrics.inc("hybrid_serve_key_rate_limited_total", key=label)
            response = error_response(
                429,
                f"API key {label!r} is over its requests_per_minute; retry in {wait} s",
                "rate_limited",
                {"Retry-After": str(wait)},
                path_of(scope),
            )
            await response(scope, receive, send)
            return
        state["key_budget_exhausted"] = bool(verdict.get("budget_exhausted"))
        await self.app(scope, receive, send)


def request_timeout(value: str, max_s: float) -> float:
    """An X-Request-Timeout header's seconds; ValueError with what to send instead."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not MIN_TIMEOUT_S <= seconds <= max_s:  # also false for NaN
        raise ValueError(f"X-Request-Timeout must be seconds in [{MIN_TIMEOUT_S:g}, {max_s:g}]")
    return seconds


def request_priority(value: str | None) -> Priority:
    """An X-Priority header's priority (interactive when absent); ValueError naming the values."""
    if value is None:
        return "interactive"
    priority = value.strip().lower()
    if priority not in PRIORITIES:
        raise ValueError(f"X-Priority must be one of {', '.join(PRIORITIES)}; got {value[:40]!r}")
    return priority


class ControlHeadersMiddleware:
    """422 for an invalid X-Request-Timeout or X-Priority on any route, as the OpenAPI document
    states them for every operation (the routes that do not read them would otherwise accept
    any value)."""

    def __init__(self, app: ASGIApp, max_s: Callable[[], float]) -> None:
        self.app = app
        self.max_s = max_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                try:
                    if name == b"x-request-timeout":
                        request_timeout(value.decode("latin-1"), self.max_s())
                    elif name == b"x-priority":
                        request_priority(value.decode("latin-1"))
                except ValueError as exc:
                    code = "invalid_timeout" if name == b"x-request-timeout" else "invalid_priority"
                    response = error_response(422, str(exc), code, path=path_of(scope))
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class AdmissionMiddleware:
    """503 + Retry-After once `limit` requests are in progress, instead of queueing without end.
    A request counts once its body has arrived: clients that send their bodies slowly hold no
    slot (the body is bounded by BodyLimitMiddleware, outside this one). Batch requests
    (X-Priority) are refused first: they may take only the share of the slots that
    `interactive_reserve` leaves, so a flood of batch work cannot shut interactive work out."""

    def __init__(
        self,
        app: ASGIApp,
        limit: Callable[[], int],
        retry_after_s: Callable[[], int],
        interactive_reserve: Callable[[], float] = lambda: 0.0,
    ):
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.interactive_reserve = interactive_reserve
        self.in_progress = 0

    def _limit_for(self, scope: Scope) -> tuple[int, Priority]:
        limit = self.limit()
        priority: Priority = "interactive"
        for name, value in scope.get("headers", []):
            if name == b"x-priority":
                try:
                    priority = request_priority(value.decode("latin-1"))
                except ValueError:
                    pass  # ControlHeadersMiddleware answers it
        if priority == "batch":
            limit = max(1, math.floor(limit * (1 - self.interactive_reserve())))
        return limit, priority

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or path_of(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        arrived: list[Message] = []
        while True:
            message = await receive()
            arrived.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        if arrived[-1]["type"] == "http.disconnect":
            return  # gone before its body was complete
        replay = iter(arrived)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        limit, priority = self._limit_for(scope)
        if self.in_progress >= limit:
            kept = (
                f"; batch requests may take {limit} of its {self.limit()}, the rest are kept "
                "for interactive ones (http.interactive_reserve)"
                if priority == "batch"
                else ""
            )
            response = error_response(
                503,
                f"the server is at capacity ({self.in_progress} requests in progress{kept}); "
                "retry shortly",
                "overloaded",
                {"Retry-After": str(self.retry_after_s())},
                path_of(scope),
            )
            await response(scope, receive, send)
            return
        self.in_progress += 1
        try:
            await self.app(scope, replayed, send)
        finally:
            self.in_progress -= 1


class _TooLarge(StarletteHTTPException):
    # An HTTPException, so that FastAPI's body parsing passes it through instead of turning it
    # into "There was an error parsing the body".
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 for bodies over the limit, whether announced by Content-Length or streamed chunked."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes  # read per request: the limit is configuration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    announced = -1
                if announced > limit:
                    await self._reject(scope, receive, send, limit)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, receive, send, limit)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(
            413,
            f"request body is larger than the limit of {limit} bytes",
            "body_too_large",
            path=path_of(scope),
        )
        await response(scope, receive, send)


# -- telemetry ---------------------------------------------------------------------------------

ENDPOINTS = frozenset(
    {
        "/v1/answer",
        "/v1/search",
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/models",
        "/v1/documents",
        "/v1/usage",
        "/healthz",
        "/readyz",
        "/docs",
        "/openapi.json",
    }
)
# What a handler may add to the request's log line and metrics (through request.state.outcome):
# numbers, ids and enums only, never text.
OUTCOME_FIELDS = (
    "answer_route",
    "confidence",
    "escalated",
    "reasons",
    "degraded",
    "cost_usd",
    "verification_score",
    "subtasks",
    "tokens_in",
    "tokens_out",
    "cache",
    "api_key",
)


def endpoint_of(path: str) -> str:
    """A low-cardinality name for metrics and span names: document ids are not labels."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/documents/"):
        return "/v1/documents/{doc_id}"
    return "other"


class JSONLineFormatter(logging.Formatter):
    """One JSON object per line: the record's message and its `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        return json.dumps(line, separators=(",", ":"), default=str)


def request_logger() -> logging.Logger:
    """`hybrid_serve.requests`: JSON lines on stderr (Ray keeps them in the replica's log)."""
    logger = logging.getLogger("hybrid_serve.requests")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JSONLineFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class RequestTelemetryMiddleware:
    """The request's server span (continuing a caller's W3C `traceparent`), its metrics and one
    JSON log line. Headers other than the trace context are never read: no key can leak."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = request_logger()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_of(path_of(scope))
        method = scope.get("method", "GET")
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers", [])
            if k in (b"traceparent", b"tracestate")
        }
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500  # if the app ends without starting a response
        start = time.perf_counter()

        def annotate() -> None:
            outcome = state.get("outcome") or {}
            tracing.set_attributes(
                span,
                {
                    "http.response.status_code": status,
                    "hybrid.route": outcome.get("answer_route"),
                    "hybrid.confidence": outcome.get("confidence"),
                },
            )

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                annotate()
                if cache := state.get("cache"):  # every answer endpoint, streamed or not
                    headers = list(message.get("headers", []))
                    headers.append((b"x-hybrid-serve-cache", cache.encode()))
                    message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                annotate()  # a stream's outcome is known at its end; an outer span may end here
            await send(message)

        attributes = {"http.request.method": method, "http.route": endpoint}
        with tracing.request_span(f"{method} {endpoint}", carrier, attributes) as span:
            state["trace_id"] = tracing.trace_id()
            try:
                await self.app(scope, receive, observed_send)
            finally:
                latency_ms = (time.perf_counter() - start) * 1000
                outcome = {
                    k: v for k, v in (state.get("outcome") or {}).items() if k in OUTCOME_FIELDS
                }
                if "api_key" in state:  # the key's label, never the key
                    outcome["api_key"] = state["api_key"]
                self._record(method, endpoint, status, latency_ms, state["trace_id"], outcome)

    def _record(
        self,
        method: str,
        endpoint: str,
        status: int,
        latency_ms: float,
        trace_id: str,
        outcome: dict[str, Any],
    ) -> None:
        route = str(outcome.get("answer_route") or "none")
        metrics.inc(
            "hybrid_serve_requests_total", endpoint=endpoint, answer_route=route, status=str(status)
        )
        metrics.observe(
            "hybrid_serve_request_latency_ms", latency_ms, endpoint=endpoint, answer_route=route
        )
        if endpoint in ("/healthz", "/readyz"):
            return  # probes: counted, not logged
        fields = {
            "trace_id": trace_id,
            "method": method,
            "endpoint": endpoint,
            "status": status,
            "latency_ms": round(latency_ms, 1),
            **outcome,
        }
        self.log.info("request", extra={"fields": fields})
