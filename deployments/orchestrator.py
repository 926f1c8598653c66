"""Orchestrator: the HTTP ingress. Validates, hands the request to the lead agent, shapes errors."""

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from hybrid_serve import __version__
from hybrid_serve.agents import tracing
from hybrid_serve.agents.claude import ClaudeCall, ClaudeResult, ClaudeUnavailable, Role
from hybrid_serve.agents.lead import DeadlineExceeded, Lead, SLMStreamEnded
from hybrid_serve.agents.shadow import Verdict, VerdictLog, shadow_log_path
from hybrid_serve.config import APIKey, HTTPConfig, HybridServeConfig
from hybrid_serve.deployments import anthropic_api as aapi
from hybrid_serve.deployments import openai_api as oai
from hybrid_serve.deployments import openapi, sse
from hybrid_serve.deployments.errors import (
    MESSAGES_PATH,
    APIError,
    MessagesErrorBody,
    error_responses,
    install_error_handlers,
)
from hybrid_serve.deployments.health import deployment_health
from hybrid_serve.deployments.metrics import metrics, record_answer
from hybrid_serve.deployments.middleware import (
    AdmissionMiddleware,
    APIKeyMiddleware,
    BodyLimitMiddleware,
    DeadlineHeaderMiddleware,
    KeyLimitMiddleware,
    RequestTelemetryMiddleware,
    request_timeout,
)
from hybrid_serve.deployments.placement import placement
from hybrid_serve.deployments.retriever import IndexNotReady
from hybrid_serve.retrieval.store import DocRecord, NewDocument
from hybrid_serve.schemas import (
    COLLECTION_PATTERN,
    AnswerRequest,
    AnswerResponse,
    Collections,
    DocumentBatch,
    DocumentIn,
    DocumentInfo,
    GenerationRequest,
    GenerationResult,
    Passage,
    SearchRequest,
    SearchResponse,
    Usage,
)

app = FastAPI(
    title="hybrid-serve",
    version=__version__,
    description="Retrieval-grounded answers from a small model, with Claude when it adds value.",
)
install_error_handlers(app)
# Limits are configuration, read per request from app.state (set by the replica's constructor).
app.state.http = HTTPConfig()
app.state.admit = None  # KeyLimits' admission, set by a replica whose keys are configured


def _openapi() -> dict[str, Any]:
    """The document with the replica's configured limits (see deployments/openapi.py)."""
    if app.openapi_schema is None:
        app.openapi_schema = openapi.document(app, app.state.http)
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]
app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: app.state.http.max_body_bytes)
app.add_middleware(
    AdmissionMiddleware,
    limit=lambda: app.state.http.max_concurrent_requests,
    retry_after_s=lambda: app.state.http.retry_after_s,
)
app.add_middleware(DeadlineHeaderMiddleware, max_s=lambda: app.state.http.max_request_timeout_s)
app.add_middleware(KeyLimitMiddleware, admit=lambda: app.state.admit)
app.add_middleware(APIKeyMiddleware, keys=lambda: app.state.http.keys())
app.add_middleware(RequestTelemetryMiddleware)

log = logging.getLogger("ray.serve")
STATUS_TIMEOUT_S = 5.0
# Waits before each repeat of a read whose replica died: Serve's routers learn of the death within
# about a second, and its controller starts a replacement.
REPLICA_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)
CLAUDE_STATUS_TTL_S = 10.0
HEALTH_TTL_S = 5.0
# The lead answers by its deadline on its own; this is the backstop for what it does not bound.
DEADLINE_GRACE_S = 1.0


def _deployment_of(method: Any) -> str:
    return str(getattr(method, "deployment_name", "unknown"))


def _cause(exc: BaseException) -> BaseException:
    """The exception raised inside a replica, unwrapped from Ray's RayTaskError."""
    return getattr(exc, "cause", None) or exc


@dataclass
class CacheProbe:
    """A cache lookup that missed: what storing the answer needs."""

    key: str
    text: str
    vector: list[float]
    index_version: int
    owner: str


# Who is calling: the key's label and what it may read and write. Without keys configured the
# API is open and every caller may do everything.
OPEN_ACCESS = APIKey(key="open", name="", admin=True)


def access_of(keys: dict[str, APIKey], request: Request) -> APIKey | None:
    """The caller's key as configured, from the label APIKeyMiddleware put in the request; None
    for a caller without a valid key (only the open routes see one)."""
    if not keys:
        return OPEN_ACCESS
    return keys.get(getattr(request.state, "api_key", None) or "")


def cache_scope(
    kind: str,
    req: AnswerRequest,
    claude_down: str | None,
    history: list[dict[str, str]] | None = None,
    **options: Any,
) -> str:
    """Everything besides the question that shapes an answer: an entry serves only requests
    that agree on all of it (the conversation before the question too, by digest)."""
    turns = json.dumps(history or [], sort_keys=True).encode()
    return json.dumps(
        {
            "kind": kind,
            "mode": req.mode,
            "verify": req.verify,
            "sensitive": req.sensitive,
            "pii": req.pii,
            "top_k": req.top_k,
            "claude": claude_down,
            "history": hashlib.sha256(turns).hexdigest() if history else None,
            **options,
        },
        sort_keys=True,
    )


@dataclass
class _Chat:
    """A chat request of either API, reduced to what the lead needs."""

    model: str
    req: AnswerRequest
    history: list[dict[str, str]]
    retrieval: bool
    sampling: dict[str, Any]


def _conversation(
    turns: list[dict[str, str]], h: oai.HybridOptions
) -> tuple[AnswerRequest, list[dict[str, str]]]:
    """The last user message as the request; the turns before it as its history (what follows
    it, such as an assistant prefill, is not used)."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "user")
    req = AnswerRequest(
        query=turns[last]["content"],
        top_k=h.top_k,
        mode=h.mode,
        verify=h.verify,
        sensitive=h.sensitive,
        pii=h.pii,
        use_cache=h.use_cache,
    )
    return req, turns[:last]


async def _iterate(items: Any) -> AsyncIterator[str]:
    for item in items:
        yield item


CollectionQuery = Annotated[
    str | None,
    Query(
        pattern=COLLECTION_PATTERN,
        description="The document's collection. Unset: GET looks in every collection the key "
        "reads; DELETE uses the key's first collection.",
    ),
]


def saved_usd(answer: AnswerResponse) -> float:
    return answer.usage.cost_usd + answer.usage.slm_cost_usd


async def remote(method: Any, *args: Any) -> Any:
    """`method` of a deployment handle, with the trace context. Cancelling the caller (a deadline,
    a client gone) cancels the call in the other replica too: Serve does that only when asked."""
    response = method.remote(*args, trace_context=tracing.carrier())
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


def _timeout(request: Request, http: HTTPConfig, asked: float | None = None) -> float:
    """The request's deadline in seconds: `timeout_s` in the body, else the X-Request-Timeout
    header, else http.request_timeout_s; at most http.max_request_timeout_s."""
    if asked is None and (header := request.headers.get("x-request-timeout")) is not None:
        try:
            asked = request_timeout(header, http.max_request_timeout_s)
        except ValueError as exc:  # DeadlineHeaderMiddleware answers these first
            raise APIError(422, str(exc), "invalid_timeout") from None
    return min(asked or http.request_timeout_s, http.max_request_timeout_s)


async def _bounded(work: Any, timeout_s: float, grace_s: float = 0.0) -> Any:
    """A route's work within its deadline (and `grace_s` for work that bounds itself): 504 when
    nothing is ready by then."""
    try:
        return await asyncio.wait_for(work, timeout_s + grace_s)
    except (TimeoutError, DeadlineExceeded) as exc:
        raise _deadline_error(timeout_s, exc) from None


def _deadline_error(timeout_s: float, exc: BaseException) -> APIError:
    step = getattr(exc, "step", None)
    metrics.inc("hybrid_serve_deadline_exceeded_total", step=step or "request")
    return APIError(
        504,
        f"no answer within the request's deadline of {timeout_s:g} s"
        + (f" (it ran out during {step})" if step else "")
        + "; send a longer X-Request-Timeout, or retry",
        "deadline_exceeded",
    )


def _not_ready_state(health: dict[str, Any]) -> str:
    status = health.get("status", "unknown")
    if status == "DEPLOY_FAILED":
        return "failed to start: " + health.get("message", "see the Ray logs")
    if health.get("restarts"):
        return f"restarting: {health['restarts']} replica crash(es), last: {health['last_death']}"
    if status == "UNHEALTHY":
        return "unhealthy: " + health.get("message", "health checks failing")
    return "starting"


class ClaudeViaHandle:
    """The lead's ClaudeRoles over the ClaudeProxy handle: errors come back as ClaudeUnavailable."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def _remote(self, method: Any, *args: Any) -> Any:
        try:
            return await remote(method, *args)
        except Exception as exc:
            cause = _cause(exc)
            if isinstance(cause, ClaudeUnavailable):
                raise ClaudeUnavailable(cause.reason, cause.detail) from None
            # The proxy itself is gone or broken: the request goes on without Claude.
            raise ClaudeUnavailable("claude_unavailable", type(cause).__name__) from None

    async def call(self, role: Role, request: ClaudeCall) -> ClaudeResult:
        return await self._remote(self.handle.call, role, request)

    async def finish_request(
        self,
        request_id: str,
        slm_cost_usd: float,
        all_claude_estimate_usd: float,
        requests: int = 1,
    ) -> None:
        await self._remote(
            self.handle.finish_request,
            request_id,
            slm_cost_usd,
            all_claude_estimate_usd,
            requests,
        )


@serve.deployment(name="Orchestrator")
@serve.ingress(app)
class Orchestrator:
    def __init__(
        self,
        retriever: DeploymentHandle,
        slm: DeploymentHandle,
        claude: DeploymentHandle,
        cache: DeploymentHandle,
        key_limits: DeploymentHandle,
        config: dict[str, Any],
    ) -> None:
        self.cfg = HybridServeConfig.from_args(config)
        tracing.setup("Orchestrator", self.cfg.tracing)
        self.retriever = retriever
        self.slm = slm
        self.claude = claude
        self.cache = cache
        self.key_limits = key_limits
        self._background: set[asyncio.Task[Any]] = set()
        replica = serve.get_replica_context().replica_id.unique_id
        self.verdicts = VerdictLog(shadow_log_path(Path(self.cfg.data_dir), replica))
        self.lead = Lead(
            retrieve=self._retrieve,
            generate=self._generate,
            generate_stream=self._generate_stream,
            config=self.cfg,
            claude=ClaudeViaHandle(claude),
            on_verdict=self._shadow_verdict,
        )
        self._claude_status: tuple[float, dict[str, Any]] | None = None
        self._health_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        app.state.http = self.cfg.http
        app.state.admit = self._admit if self.cfg.http.api_keys else None
        self.keys = {k.label(): k for k in self.cfg.http.keys()}

    def _access(self, request: Request) -> APIKey:
        """The caller of a route behind the key check."""
        caller = access_of(self.keys, request)
        if caller is None:  # APIKeyMiddleware answers 401 before a route runs
            raise APIError(401, "missing or invalid API key", "invalid_api_key")
        return caller

    async def _shadow_verdict(self, verdict: Verdict) -> None:
        """A background grade of a kept answer: counted, and logged for `calibrate --from-log`."""
        metrics.inc(
            "hybrid_serve_shadow_verdicts_total", verdict="wrong" if verdict.wrong else "right"
        )
        await asyncio.to_thread(self.verdicts.append, verdict)

    # -- calls to other deployments, with their failures mapped to HTTP ---------------------

    async def _call(self, method: Any, *args: Any, retry: bool = False) -> Any:
        """`method` of another deployment's handle, with the trace context. `retry`: the call is
        a read, so when its replica dies under it the call goes again, to a live replica (or
        Serve's replacement); a write is never repeated behind the client's back."""
        attempts = 1 + (len(REPLICA_RETRY_BACKOFF_S) if retry else 0)
        for attempt in range(attempts):
            try:
                return await remote(method, *args)
            except BackPressureError as exc:
                raise APIError(
                    503,
                    "the cluster is at capacity; retry shortly",
                    "overloaded",
                    {"Retry-After": "2"},
                ) from exc
            except RayActorError as exc:
                if attempt + 1 == attempts:
                    raise APIError(
                        503,
                        "a replica failed during the request; retry",
                        "replica_failed",
                        {"Retry-After": "1"},
                    ) from exc
                metrics.inc("hybrid_serve_replica_retries_total", target=_deployment_of(method))
                tracing.annotate({"hybrid.replica_retries": attempt + 1})
                await asyncio.sleep(REPLICA_RETRY_BACKOFF_S[attempt])
            except Exception as exc:
                if isinstance(_cause(exc), IndexNotReady):
                    raise APIError(
                        503,
                        f"{_cause(exc)}; retry shortly",
                        "index_not_ready",
                        {"Retry-After": "5"},
                    ) from exc
                raise
        raise AssertionError("unreachable")

    async def _retrieve(
        self, query: str, top_k: int, collections: Collections = None
    ) -> list[Passage]:
        return await self._call(self.retriever.search, query, top_k, collections, retry=True)

    async def _generate(self, req: GenerationRequest) -> GenerationResult:
        return await self._call(self.slm.generate, req, retry=True)

    async def _generate_stream(
        self, req: GenerationRequest
    ) -> AsyncIterator[str | GenerationResult]:
        """Deltas as the SLM writes them. Not repeated when its replica dies: part of the text
        may have been sent; the stream ends with an in-band error instead."""
        stream = self.slm.options(stream=True).generate_stream.remote(
            req, trace_context=tracing.carrier()
        )
        try:
            async for item in stream:
                yield item
        except RayActorError as exc:
            raise APIError(
                503, "the SLM replica failed mid-stream; retry", "replica_failed"
            ) from exc

    async def _claude(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._claude_status and now - self._claude_status[0] < CLAUDE_STATUS_TTL_S:
            return self._claude_status[1]
        try:
            status = await asyncio.wait_for(self.claude.status.remote(), STATUS_TIMEOUT_S)
        except Exception as exc:  # a dead proxy is a degraded cluster, not a failed request
            status = {"ready": False, "available": False, "reason": type(exc).__name__}
        self._claude_status = (now, status)
        return status

    async def _claude_down(self, request: Request) -> str | None:
        """Only a missing key (or a dead proxy), and a client key over its daily Claude budget,
        are known ahead; the cluster's circuit and budget are checked call by call inside the
        proxy."""
        status = await self._claude()
        if status.get("reason") == "no_api_key" or not status.get("ready", True):
            return "claude_unavailable"
        if getattr(request.state, "key_budget_exhausted", False):
            return "key_budget_exhausted"
        return None

    # -- API keys, the answer cache --------------------------------------------------------------

    async def _admit(self, label: str) -> dict[str, Any]:
        return await asyncio.wait_for(self.key_limits.admit.remote(label), STATUS_TIMEOUT_S)

    def _later(self, work: Any) -> None:
        """Bookkeeping the response does not wait for (cache stores, key usage)."""

        async def run() -> None:
            try:
                await work
            except Exception as exc:
                log.warning("background %s failed: %s", type(work).__name__, exc)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _probe(
        self, request: Request, req: AnswerRequest, scope: str
    ) -> tuple[CacheProbe | None, AnswerResponse | None]:
        """The cached answer to `req` asked under `scope`, or the probe to store a new one by
        (None when the request may not use the cache)."""
        c = self.cfg.cache
        asked_not = "no-cache" in request.headers.get("cache-control", "").lower()
        sensitive = self.lead.sensitivity.request(req)
        if not c.enabled or asked_not or not req.use_cache or (sensitive and not c.sensitive):
            request.state.cache = "bypass"
            return None, None
        caller = self._access(request)
        readable = caller.readable()
        # Entries are partitioned by what the caller may read: an answer is only ever reused
        # for a caller who could have retrieved its evidence.
        scope = json.dumps([scope, sorted(readable) if readable is not None else None])
        try:
            embed = self.retriever.embed_versioned
            vector, version = await self._call(embed, req.query, retry=True)
            found = await remote(self.cache.lookup, scope, req.query, vector, version)
        except APIError:
            raise
        except Exception as exc:  # the cache is an optimisation: without it, answer afresh
            log.warning("answer cache unavailable: %s", type(_cause(exc)).__name__)
            request.state.cache = "bypass"
            return None, None
        owner = caller.label() if self.keys else ""
        if found is None:
            request.state.cache = "miss"
            return CacheProbe(scope, req.query, vector, version, owner), None
        answer, similarity, question, stored_by = found
        cached = AnswerResponse.model_validate(answer)
        saved = saved_usd(cached)
        metrics.inc("hybrid_serve_answer_cache_saved_usd_total", saved)
        request.state.cache = "hit"
        update: dict[str, Any] = {
            "usage": Usage(),
            "cache": "hit",
            "cached_question": question,
            "deadline": None,
            "trace_id": request.state.trace_id,
        }
        if stored_by != owner:  # never another caller's wording
            update.update(
                cached_question=None,
                searched_query=None,
                subtasks=[st.model_copy(update={"question": ""}) for st in cached.subtasks],
            )
        hit = cached.model_copy(update=update)
        tracing.annotate({"hybrid.cache": "hit", "hybrid.cache.similarity": similarity})
        self._count_key(request, hit, saved)
        return None, hit

    def _observed(
        self,
        request: Request,
        answer: AnswerResponse,
        probe: CacheProbe | None = None,
        claude_down: str | None = None,
    ) -> AnswerResponse:
        """The answer's metrics and its outcome for the request's log line and span; a fresh
        answer is cached (when it may be) and counted against the client's key."""
        cache = getattr(request.state, "cache", "bypass")
        metrics.inc("hybrid_serve_answer_cache_total", result=cache)
        if answer.cache == "hit":
            request.state.outcome = {
                "answer_route": answer.route,
                "confidence": answer.confidence,
                "cache": "hit",
            }
            return answer
        answer.cache = cache
        request.state.outcome = {**record_answer(answer), "cache": cache}
        self._count_key(request, answer, 0.0)
        cut = answer.deadline is not None and answer.deadline.cut
        transient = set(answer.degraded) - {claude_down}
        if probe is not None and not cut and not transient and answer.answer.strip():
            if not answer.sensitive or self.cfg.cache.sensitive:
                body = answer.model_dump(mode="json")
                store = self.cache.store
                self._later(
                    remote(
                        store,
                        probe.key,
                        probe.text,
                        probe.vector,
                        body,
                        probe.index_version,
                        saved_usd(answer),
                        probe.owner,
                    )
                )
        return answer

    def _count_key(self, request: Request, answer: AnswerResponse, saved: float) -> None:
        label = getattr(request.state, "api_key", None)
        if label is None:
            return
        u = answer.usage
        hit = answer.cache == "hit"
        self._later(remote(self.key_limits.record, label, u.cost_usd, u.slm_cost_usd, saved, hit))

    def _check_query(self, query: str) -> None:
        limit = self.cfg.http.max_query_chars
        if len(query) > limit:
            raise APIError(
                422, f"query is {len(query)} characters; the limit is {limit}", "query_too_long"
            )

    # -- routes --------------------------------------------------------------------------------

    @app.post(
        "/v1/answer",
        response_model=AnswerResponse,
        summary="Answer a question with citations",
        description="With `stream: true`, Server-Sent Events: `plan` and `subtask` (decomposed "
        "queries), `answer` (text deltas; `reset: true` restarts the text), `verification`, then "
        "`done` with this response object, or `error`.",
        responses={
            **error_responses(401, 413, 422, 503, 504),
            200: {"content": {"text/event-stream": {}}},
        },
    )
    async def answer(self, body: AnswerRequest, request: Request) -> Any:
        trace_id = request.state.trace_id
        timeout = _timeout(request, self.cfg.http, body.timeout_s)
        self._check_query(body.query)
        down = await self._claude_down(request)
        probe, hit = await self._probe(request, body, cache_scope("answer", body, down))
        if body.stream:
            return await self._stream_answer(body, request, down, timeout, probe, hit)
        if hit is not None:
            return self._observed(request, hit)
        answer = self.lead.answer(
            body,
            trace_id,
            claude_down=down,
            timeout_s=timeout,
            collections=self._access(request).readable(),
        )
        answer = await _bounded(answer, timeout, DEADLINE_GRACE_S)
        return self._observed(request, answer, probe, down)

    async def _stream_answer(
        self,
        body: AnswerRequest,
        request: Request,
        down: str | None,
        timeout: float,
        probe: CacheProbe | None,
        hit: AnswerResponse | None,
    ) -> StreamingResponse:
        """Events as the lead makes progress. Nothing is sent until the first event, so a request
        that fails early (overload, index not ready) still gets its HTTP status; one that reaches
        its deadline after that ends with an in-band `error` event."""

        async def run(emit: sse.Emit) -> dict[str, Any]:
            if hit is not None:
                await emit("answer", {"delta": hit.answer})
                return self._observed(request, hit).model_dump(mode="json")
            work = self.lead.answer(
                body,
                request.state.trace_id,
                claude_down=down,
                emit=emit,
                timeout_s=timeout,
                collections=self._access(request).readable(),
            )
            answer = await _bounded(work, timeout, DEADLINE_GRACE_S)
            return self._observed(request, answer, probe, down).model_dump(mode="json")

        events = sse.emitted(run)
        first = await anext(events)

        async def body_events() -> AsyncIterator[str]:
            yield sse.event(first[1], first[0])
            async for name, data in events:
                yield sse.event(data, name)

        return sse.response(body_events(), error_event="error")

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        summary="Retrieval only: the fused ranking the answers are built from",
        responses=error_responses(401, 413, 422, 503, 504),
    )
    async def search(self, body: SearchRequest, request: Request) -> SearchResponse:
        self._check_query(body.query)
        readable = self._access(request).readable()
        search = self.retriever.search_versioned
        work = self._call(search, body.query, body.top_k, readable, retry=True)
        passages, version = await _bounded(work, _timeout(request, self.cfg.http))
        return SearchResponse(passages=passages, index_version=version)

    # -- OpenAI-compatible ------------------------------------------------------------------

    @app.get("/v1/models", summary="Models (OpenAI-compatible)")
    async def models(self) -> dict[str, Any]:
        return oai.models_list()

    @app.post(
        "/v1/chat/completions",
        summary="Chat completions (OpenAI-compatible; `hybrid` extension field)",
        description="With `stream: true`, Server-Sent Events of chat.completion.chunk objects, "
        "ending with `data: [DONE]`.",
        responses={
            **error_responses(401, 404, 413, 422, 503, 504),
            200: {"content": {"application/json": {}, "text/event-stream": {}}},
        },
    )
    async def chat_completions(self, body: oai.ChatCompletionRequest, request: Request) -> Any:
        self._check_chat(
            len(body.messages), [body.max_tokens, body.max_completion_tokens], body.texts()
        )
        turns = [{"role": m.role, "content": m.text()} for m in body.messages]
        req, history = _conversation(turns, body.hybrid)
        chat = _Chat(body.model, req, history, body.hybrid.retrieval, body.sampling())
        chunks = oai.Chunks(oai.completion_id(), body.model)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        timeout = _timeout(request, self.cfg.http)
        if body.model == "slm" and body.stream:
            probe, hit = await self._probe(request, req, self._chat_scope(chat, None))
            if hit is None:
                events = self._slm_events(request, chat, timeout, probe)
                return sse.response(self._stream_slm(chunks, events, include_usage))
            answer, finish = self._observed(request, hit), "stop"
        else:
            answer, finish = await self._chat_answer(request, chat, timeout)
        if body.stream:
            return sse.response(self._stream_settled(chunks, answer, include_usage))
        return oai.completion(chunks.cid, body.model, finish, answer)

    @app.post(
        MESSAGES_PATH,
        summary="Messages (Anthropic Messages API; `hybrid` extension field)",
        description="The `anthropic` SDK's `messages.create` with `base_url` set to the cluster. "
        "With `stream: true`, Server-Sent Events as the Messages API sends them (message_start, "
        "content_block_start/delta/stop, message_delta, message_stop; `error` in-band).",
        responses={
            **error_responses(401, 404, 413, 422, 429, 503, 504, model=MessagesErrorBody),
            200: {"content": {"application/json": {}, "text/event-stream": {}}},
        },
    )
    async def messages(self, body: aapi.MessagesRequest, request: Request) -> Any:
        self._check_chat(len(body.messages), [body.max_tokens], body.texts())
        req, history = _conversation(body.turns(), body.hybrid)
        sampling = body.sampling()
        if body.model == "hybrid":
            # max_tokens is required here, so clients send a generous ceiling (1024 is common):
            # the pipeline keeps its own shorter SLM answers under it.
            sampling["max_tokens"] = min(body.max_tokens, self.cfg.slm.max_tokens)
        chat = _Chat(body.model, req, history, body.hybrid.retrieval, sampling)
        events = aapi.Events(aapi.message_id(), body.model)
        timeout = _timeout(request, self.cfg.http)
        if body.model == "slm" and body.stream:
            probe, hit = await self._probe(request, req, self._chat_scope(chat, None))
            if hit is None:
                slm = self._slm_events(request, chat, timeout, probe)
                stream = self._stream_message(events, slm)
                return sse.response(stream, error_event="error", path=MESSAGES_PATH)
            answer, finish = self._observed(request, hit), "stop"
        else:
            answer, finish = await self._chat_answer(request, chat, timeout)
        reason = aapi.stop_reason(finish)
        if body.stream:
            stream = _iterate(events.settled(answer, reason))
            return sse.response(stream, error_event="error", path=MESSAGES_PATH)
        return aapi.message(events.mid, body.model, answer, reason)

    # -- chat, for both APIs ---------------------------------------------------------------------

    def _check_chat(self, messages: int, max_tokens: list[int | None], texts: list[str]) -> None:
        """The configured limits: every token ceiling a client set, not only the one in effect
        (the OpenAI API has two)."""
        http = self.cfg.http
        if messages > http.max_messages:
            raise APIError(
                422, f"{messages} messages; the limit is {http.max_messages}", "too_many_messages"
            )
        for asked in max_tokens:
            if (asked or 0) > http.max_tokens_ceiling:
                raise APIError(
                    422,
                    f"max_tokens is {asked}; the limit is {http.max_tokens_ceiling}",
                    "max_tokens_too_large",
                )
        for text in texts:
            self._check_query(text)

    def _chat_scope(self, chat: _Chat, down: str | None) -> str:
        return cache_scope(
            "chat",
            chat.req,
            down,
            chat.history,
            model=chat.model,
            retrieval=chat.retrieval,
            sampling=chat.sampling,
        )

    async def _chat_answer(
        self, request: Request, chat: _Chat, timeout: float
    ) -> tuple[AnswerResponse, oai.Finish]:
        """A chat answer, whole (the hybrid pipeline settles its text before it streams)."""
        trace_id = request.state.trace_id
        down = await self._claude_down(request) if chat.model == "hybrid" else None
        probe, hit = await self._probe(request, chat.req, self._chat_scope(chat, down))
        if hit is not None:
            return self._observed(request, hit), "stop"
        finish: oai.Finish = "stop"
        if chat.model == "slm":
            work = self.lead.answer_slm(
                chat.req,
                trace_id,
                chat.retrieval,
                chat.sampling,
                chat.history,
                timeout_s=timeout,
                collections=self._access(request).readable(),
            )
            answer, finish = await _bounded(work, timeout, DEADLINE_GRACE_S)
        else:
            work = self.lead.answer(
                chat.req,
                trace_id,
                claude_down=down,
                sampling=chat.sampling,
                history=chat.history,
                timeout_s=timeout,
                collections=self._access(request).readable(),
            )
            answer = await _bounded(work, timeout, DEADLINE_GRACE_S)
        return self._observed(request, answer, probe, down), finish

    async def _slm_events(
        self, request: Request, chat: _Chat, timeout: float, probe: CacheProbe | None
    ) -> AsyncIterator[tuple[str, Any]]:
        """The `slm` model's text deltas as it writes them, ("delta", text), then ("done",
        (answer, finish))."""

        async def run(emit: sse.Emit) -> tuple[AnswerResponse, oai.Finish]:
            work = self.lead.answer_slm(
                chat.req,
                request.state.trace_id,
                chat.retrieval,
                chat.sampling,
                chat.history,
                emit,
                timeout_s=timeout,
                collections=self._access(request).readable(),
            )
            return await _bounded(work, timeout, DEADLINE_GRACE_S)

        try:
            async for name, data in sse.emitted(run):
                if name == "answer":
                    yield "delta", data["delta"]
                elif name == "done":
                    answer, finish = data
                    yield "done", (self._observed(request, answer, probe), finish)
        except SLMStreamEnded as exc:
            raise APIError(503, "the SLM stream ended early; retry", "slm_stream_ended") from exc

    async def _stream_slm(
        self,
        chunks: oai.Chunks,
        events: AsyncIterator[tuple[str, Any]],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """Tokens as the SLM writes them, then the final chunk with the `hybrid` extension."""
        yield chunks.delta("", role=True)
        async for name, data in events:
            if name == "delta":
                yield chunks.delta(data)
            else:
                answer, finish = data
                yield chunks.final(finish, answer)
                if include_usage:
                    yield chunks.usage(answer)
        yield sse.DONE

    async def _stream_settled(
        self, chunks: oai.Chunks, answer: AnswerResponse, include_usage: bool
    ) -> AsyncIterator[str]:
        """The hybrid pipeline settles its text (citations, verification) before it streams."""
        yield chunks.delta("", role=True)
        for piece in re.findall(r"\S+\s*|\s+", answer.answer):
            yield chunks.delta(piece)
        yield chunks.final("stop", answer)
        if include_usage:
            yield chunks.usage(answer)
        yield sse.DONE

    async def _stream_message(
        self, events: aapi.Events, slm: AsyncIterator[tuple[str, Any]]
    ) -> AsyncIterator[str]:
        """The `slm` model's tokens as one text block; its citations follow as citations_delta
        events once they are known, before the block closes."""
        yield events.start()
        yield events.open_block()
        async for name, data in slm:
            if name == "delta":
                yield events.text(data)
            else:
                answer, finish = data
                for event in events.citations(aapi.locations(answer, answer.answer)):
                    yield event
                yield events.close_block()
                for event in events.finish(answer, aapi.stop_reason(finish)):
                    yield event

    # -- documents ---------------------------------------------------------------------------

    @app.post(
        "/v1/documents",
        status_code=201,
        summary="Add or replace documents (durable on 2xx)",
        responses=error_responses(401, 413, 422, 503, 504),
    )
    async def add_documents(
        self, body: Annotated[DocumentIn | DocumentBatch, Body()], request: Request
    ) -> dict[str, Any]:
        docs = body.documents if isinstance(body, DocumentBatch) else [body]
        caller = self._access(request)
        new = [
            NewDocument(
                id=d.id,
                title=d.title,
                text=d.text,
                metadata=d.metadata,
                collection=self._writable(caller, d.collection),
            )
            for d in docs
        ]
        result = await self._write(request, self._call(self.retriever.upsert, new))
        return {"ids": result["ids"], "index_version": result["index_version"]}

    @staticmethod
    def _writable(caller: APIKey, collection: str | None) -> str:
        """The collection a write goes to, or 403 naming what the key may write (which it knows:
        nothing about other collections is revealed)."""
        target = collection or caller.home()
        writable = caller.writable()
        if writable is not None and target not in writable:
            allowed = ", ".join(sorted(writable)) or "none (a read-only key)"
            raise APIError(
                403,
                f"API key {caller.label()!r} may not write collection {target!r}; it writes: "
                f"{allowed}",
                "collection_forbidden",
            )
        return target

    @staticmethod
    def _readable(caller: APIKey, collection: str | None) -> Collections:
        """Where a read by id looks: the named collection if the key may read it (else nowhere:
        a document there is as absent as one that does not exist), or every readable one."""
        readable = caller.readable()
        if collection is None:
            return readable
        if readable is not None and collection not in readable:
            return frozenset()
        return frozenset([collection])

    async def _write(self, request: Request, work: Any) -> Any:
        """Writes take as long as ingestion takes, unless the client sends X-Request-Timeout: a
        default deadline would cut large batches short. A write past its deadline may still
        complete; sending it again is safe (documents are replaced by id)."""
        if "x-request-timeout" not in request.headers:
            return await work
        timeout = _timeout(request, self.cfg.http)
        try:
            return await asyncio.wait_for(work, timeout)
        except TimeoutError:
            raise APIError(
                504,
                f"not acknowledged within {timeout:g} s; the write may still complete: send it "
                "again (documents are replaced by id, so nothing is duplicated)",
                "deadline_exceeded",
            ) from None

    @app.get(
        "/v1/documents/{doc_id:path}",
        response_model=DocumentInfo,
        responses=error_responses(401, 404, 503, 504),
    )
    async def get_document(
        self, doc_id: str, request: Request, collection: CollectionQuery = None
    ) -> DocumentInfo:
        timeout = _timeout(request, self.cfg.http)
        where = self._readable(self._access(request), collection)
        record: DocRecord | None = None
        if where is None or where:
            work = self._call(self.retriever.get, doc_id, where, retry=True)
            record = await _bounded(work, timeout)
        if record is None:
            raise APIError(404, f"no document with id {doc_id!r}", "document_not_found")
        status = await _bounded(self._call(self.retriever.status, retry=True), timeout)
        return DocumentInfo(
            id=record.public_id,
            collection=record.collection,
            title=record.title,
            metadata=record.metadata,
            chunks=len(record.chunk_ids),
            index_version=status["version"],
            text=record.text,
        )

    @app.delete("/v1/documents/{doc_id:path}", responses=error_responses(401, 404, 503, 504))
    async def delete_document(
        self, doc_id: str, request: Request, collection: CollectionQuery = None
    ) -> dict[str, Any]:
        caller = self._access(request)
        target = collection or caller.home()
        if self._readable(caller, target) == frozenset():
            # Not even readable: as absent as a document that does not exist.
            raise APIError(404, f"no document with id {doc_id!r}", "document_not_found")
        target = self._writable(caller, target)
        work = self._call(self.retriever.delete, [doc_id], target)
        result = await self._write(request, work)
        if not result["deleted"]:
            raise APIError(404, f"no document with id {doc_id!r}", "document_not_found")
        return {
            "id": doc_id,
            "collection": target,
            "deleted": True,
            "index_version": result["index_version"],
        }

    @app.get(
        "/v1/usage",
        summary="Your key's usage; for an admin key, the cost ledger's totals (Claude spend, SLM "
        "cost, savings), the answer cache's, and every key's",
    )
    async def usage(self, request: Request) -> dict[str, Any]:
        """An admin key (or anyone, when the API has no keys) sees the cluster's totals and every
        key's line; any other key its own line only."""
        timeout = _timeout(request, self.cfg.http)
        caller = self._access(request)
        if not caller.admin:
            keys = await _bounded(self._call(self.key_limits.report, retry=True), timeout)
            return {"keys": {caller.label(): keys.get(caller.label(), {})}}
        status, cache = await _bounded(
            asyncio.gather(
                self._call(self.claude.status, retry=True),
                self._call(self.cache.status, retry=True),
            ),
            timeout,
        )
        totals = status.get("totals", {})
        estimate = totals.get("all_claude_cost_usd_estimate", 0.0)
        spent = totals.get("cost_usd", 0.0) + totals.get("slm_cost_usd", 0.0)
        out = {
            "totals": totals,
            "budget_remaining_usd": status.get("budget_remaining_usd"),
            "circuit": status.get("circuit"),
            "saving_ratio": round(estimate / spent, 3) if spent > 0 else None,
            "cache": {k: v for k, v in cache.items() if k not in ("ready", "placement")},
        }
        if self.keys:
            out["keys"] = await _bounded(self._call(self.key_limits.report, retry=True), timeout)
        return out

    async def status(self) -> dict[str, Any]:
        """For the deployment handle (not a route): where this replica runs."""
        return {"ready": True, "placement": placement()}

    @app.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: every deployment ready and the index loaded (details with an admin "
        "key, or when the API has no keys)",
    )
    async def readyz(self, request: Request) -> JSONResponse:
        """A deployment is ready when one of its replicas answers: Serve routes only to replicas
        whose constructor finished, and an SLM replica's constructor ends with a generation. Every
        component also carries how many of its replicas crashed, so a replica that keeps dying
        shows as such rather than as starting. Those details (spend, budget, nodes, PIDs, crash
        messages) are for an admin key; anyone else, a Kubernetes probe included, learns ready or
        not, per deployment."""
        names = ("retriever", "slm", "claude", "answer_cache", "key_limits")
        handles = (self.retriever, self.slm, self.claude, self.cache, self.key_limits)

        async def one(handle: DeploymentHandle) -> dict[str, Any]:
            try:
                status = await asyncio.wait_for(handle.status.remote(), STATUS_TIMEOUT_S)
            except Exception as exc:
                status = {"ready": False, "error": type(exc).__name__}
            health = await self._health(handle.deployment_name)
            if health.get("restarts"):
                status.update(restarts=health["restarts"], last_death=health["last_death"])
            if not status.get("ready"):
                status["state"] = _not_ready_state(health)
            return status

        results = await asyncio.gather(*(one(h) for h in handles))
        components = dict(zip(names, results))
        ready = all(c.get("ready") for c in components.values())
        caller = access_of(self.keys, request)
        if caller is None or not caller.admin:
            components = {n: {"ready": bool(c.get("ready"))} for n, c in components.items()}
        return JSONResponse(
            {"ready": ready, "version": __version__, "components": components},
            status_code=200 if ready else 503,
            headers=None if ready else {"Retry-After": "5"},
        )

    async def _health(self, deployment: str) -> dict[str, Any]:
        """Serve's state and the replica crashes of `deployment`, read at most every few seconds
        (probes come often; the actor table is cluster-wide)."""
        now = time.monotonic()
        cached = self._health_cache.get(deployment)
        if cached and now - cached[0] < HEALTH_TTL_S:
            return cached[1]
        app_name = serve.get_replica_context().app_name
        health = await asyncio.to_thread(deployment_health, app_name, deployment)
        self._health_cache[deployment] = (now, health)
        return health
