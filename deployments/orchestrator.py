"""Orchestrator: the HTTP ingress. Validates, hands the request to the lead agent, shapes errors."""

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from agents import tracing
from agents.citations import as_numbered, finalize
from agents.claude import ClaudeResult, ClaudeUnavailable
from agents.confidence import score_answer
from agents.lead import Lead, LeadSettings
from agents.prompts import answer_messages
from agents.schemas import (
    AnswerRequest,
    AnswerResponse,
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
from cluster import __version__
from cluster.config import HTTPConfig, HybridServeConfig
from deployments import openai_api as oai
from deployments.errors import APIError, error_body, error_responses, install_error_handlers
from deployments.health import deployment_health
from deployments.metrics import metrics, record_answer
from deployments.middleware import (
    AdmissionMiddleware,
    APIKeyMiddleware,
    BodyLimitMiddleware,
    RequestTelemetryMiddleware,
)
from deployments.placement import placement
from deployments.retriever import IndexNotReady
from retrieval.store import DocRecord, NewDocument

app = FastAPI(
    title="hybrid-serve",
    version=__version__,
    description="Retrieval-grounded answers from a small model, with Claude when it adds value.",
)
install_error_handlers(app)
# Limits are configuration, read per request from app.state (set by the replica's constructor).
app.state.http = HTTPConfig()
app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: app.state.http.max_body_bytes)
app.add_middleware(
    AdmissionMiddleware,
    limit=lambda: app.state.http.max_concurrent_requests,
    retry_after_s=lambda: app.state.http.retry_after_s,
)
app.add_middleware(APIKeyMiddleware, keys=lambda: app.state.http.api_keys)
app.add_middleware(RequestTelemetryMiddleware)

log = logging.getLogger("ray.serve")
STATUS_TIMEOUT_S = 5.0
# Waits before each repeat of a read whose replica died: Serve's routers learn of the death within
# about a second, and its controller starts a replacement.
REPLICA_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)
CLAUDE_STATUS_TTL_S = 10.0
HEALTH_TTL_S = 5.0


def _deployment_of(method: Any) -> str:
    return str(getattr(method, "deployment_name", "unknown"))


def _cause(exc: BaseException) -> BaseException:
    """The exception raised inside a replica, unwrapped from Ray's RayTaskError."""
    return getattr(exc, "cause", None) or exc


def _observed(request: Request, answer: AnswerResponse) -> AnswerResponse:
    """The answer's metrics, and its outcome for the request's log line and span."""
    request.state.outcome = record_answer(answer)
    return answer


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
    """The lead's ClaudePort over the ClaudeProxy handle: errors come back as ClaudeUnavailable."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            call = getattr(self.handle, method)
            return await call.remote(*args, trace_context=tracing.carrier())
        except Exception as exc:
            cause = _cause(exc)
            if isinstance(cause, ClaudeUnavailable):
                raise ClaudeUnavailable(cause.reason, cause.detail) from None
            # The proxy itself is gone or broken: the request goes on without Claude.
            raise ClaudeUnavailable("claude_unavailable", type(cause).__name__) from None

    async def rewrite(self, request_id: str, query: str, passages: Any, pii: str) -> ClaudeResult:
        return await self._call("rewrite", request_id, query, passages, pii)

    async def plan(self, request_id: str, query: str, passages: Any, pii: str) -> ClaudeResult:
        return await self._call("plan", request_id, query, passages, pii)

    async def verify(
        self, request_id: str, query: str, answer: str, passages: Any, pii: str
    ) -> ClaudeResult:
        return await self._call("verify", request_id, query, answer, passages, pii)

    async def answer(
        self, request_id: str, query: str, passages: Any, pii: str, notes: str = ""
    ) -> ClaudeResult:
        return await self._call("answer", request_id, query, passages, pii, notes)

    async def finish_request(self, request_id: str, slm_cost: float, estimate: float) -> None:
        await self._call("finish_request", request_id, slm_cost, estimate)


@serve.deployment(name="Orchestrator")
@serve.ingress(app)
class Orchestrator:
    def __init__(
        self,
        retriever: DeploymentHandle,
        slm: DeploymentHandle,
        claude: DeploymentHandle,
        config: dict[str, Any],
    ) -> None:
        self.cfg = HybridServeConfig.from_args(config)
        tracing.setup("Orchestrator", self.cfg.tracing)
        self.retriever = retriever
        self.slm = slm
        self.claude = claude
        cfg = self.cfg
        price = cfg.claude.price()
        self.lead = Lead(
            retrieve=self._retrieve,
            generate=self._generate,
            claude=ClaudeViaHandle(claude),
            settings=LeadSettings(
                max_tokens=cfg.slm.max_tokens,
                temperature=cfg.slm.temperature,
                threshold=cfg.escalation.threshold,
                verify=cfg.escalation.verify,
                verify_min_score=cfg.escalation.verify_min_score,
                pii=cfg.policies.pii,
                sensitive_patterns=cfg.policies.sensitive_patterns,
                sensitive_tags=cfg.policies.sensitive_tags,
                claude_input_usd_per_mtok=price.input,
                claude_output_usd_per_mtok=price.output,
                slm_usd_per_hour=cfg.cost.slm_gpu_hour_usd,
                subtask_timeout_s=cfg.escalation.subtask_timeout_s,
            ),
        )
        self._claude_status: tuple[float, dict[str, Any]] | None = None
        self._health_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        app.state.http = self.cfg.http

    # -- calls to other deployments, with their failures mapped to HTTP ---------------------

    async def _call(self, method: Any, *args: Any, retry: bool = False) -> Any:
        """`method` of another deployment's handle, with the trace context. `retry`: the call is
        a read, so when its replica dies under it the call goes again, to a live replica (or
        Serve's replacement); a write is never repeated behind the client's back."""
        attempts = 1 + (len(REPLICA_RETRY_BACKOFF_S) if retry else 0)
        for attempt in range(attempts):
            try:
                return await method.remote(*args, trace_context=tracing.carrier())
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

    async def _retrieve(self, query: str, top_k: int) -> list[Passage]:
        return await self._call(self.retriever.search, query, top_k, retry=True)

    async def _generate(self, req: GenerationRequest) -> GenerationResult:
        return await self._call(self.slm.generate, req, retry=True)

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

    async def _claude_down(self) -> str | None:
        """Only a missing key (or a dead proxy) is known ahead; circuit and budget are checked
        call by call inside the proxy."""
        status = await self._claude()
        if status.get("reason") == "no_api_key" or not status.get("ready", True):
            return "claude_unavailable"
        return None

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
            **error_responses(401, 413, 422, 503),
            200: {"content": {"text/event-stream": {}}},
        },
    )
    async def answer(self, body: AnswerRequest, request: Request) -> Any:
        trace_id = request.state.trace_id
        self._check_query(body.query)
        down = await self._claude_down()
        if body.stream:
            return await self._stream_answer(body, request, down)
        return _observed(request, await self.lead.answer(body, trace_id, claude_down=down))

    async def _stream_answer(
        self, body: AnswerRequest, request: Request, down: str | None
    ) -> StreamingResponse:
        """Events as the lead makes progress. Nothing is sent until the first event, so a request
        that fails early (overload, index not ready) still gets its HTTP status."""
        queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()

        async def emit(name: str, data: dict[str, Any]) -> None:
            await queue.put((name, data))

        async def run() -> None:
            try:
                response = await self.lead.answer(
                    body, request.state.trace_id, claude_down=down, emit=emit
                )
                _observed(request, response)
                await queue.put(("done", response.model_dump(mode="json")))
            finally:
                await queue.put(None)

        task = asyncio.create_task(run())
        first = await queue.get()
        if first is None:  # ended before any event: an error, raised with its status
            await task
            raise RuntimeError("the answer ended without a result")

        async def events() -> AsyncIterator[str]:
            item: tuple[str, dict[str, Any]] | None = first
            try:
                while item is not None:
                    name, data = item
                    yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
                    item = await queue.get()
                await task  # re-raises a failure after the first event
            finally:
                task.cancel()  # the client went away: outstanding sub-tasks stop

        return self._sse(events(), error_event="error")

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        summary="Retrieval only: the fused ranking the answers are built from",
        responses=error_responses(401, 413, 422, 503),
    )
    async def search(self, body: SearchRequest) -> SearchResponse:
        self._check_query(body.query)
        passages, version = await self._call(
            self.retriever.search_versioned, body.query, body.top_k, retry=True
        )
        return SearchResponse(passages=passages, index_version=version)

    # -- OpenAI-compatible ------------------------------------------------------------------

    @app.get("/v1/models", summary="Models (OpenAI-compatible)")
    async def models(self) -> dict[str, Any]:
        return oai.models_list()

    @app.post(
        "/v1/chat/completions",
        summary="Chat completions (OpenAI-compatible; `hybrid` extension field)",
        responses=error_responses(401, 404, 413, 422, 503),
    )
    async def chat_completions(self, body: oai.ChatCompletionRequest, request: Request) -> Any:
        trace_id = request.state.trace_id
        if body.model not in oai.MODELS:
            raise APIError(
                404,
                f"The model '{body.model}' does not exist; available: {', '.join(oai.MODELS)}",
                "model_not_found",
            )
        http = self.cfg.http
        if len(body.messages) > http.max_messages:
            raise APIError(
                422,
                f"{len(body.messages)} messages; the limit is {http.max_messages}",
                "too_many_messages",
            )
        if (body.limit_tokens or 0) > http.max_tokens_ceiling:
            raise APIError(
                422,
                f"max_tokens is {body.limit_tokens}; the limit is {http.max_tokens_ceiling}",
                "max_tokens_too_large",
            )
        if body.messages[-1].role != "user":
            raise APIError(422, "the last message must have role 'user'", "no_user_message")
        query = body.messages[-1].text()
        if not query.strip():
            raise APIError(422, "the last user message is empty", "empty_query")
        self._check_query(query)
        history = [{"role": m.role, "content": m.text()} for m in body.messages[:-1]]
        cid = oai.completion_id()
        if body.model == "slm" and body.stream:
            return self._sse(self._stream_slm(cid, body, query, history, request))
        if body.model == "slm":
            answer, finish = await self._slm_only(body, query, history, trace_id)
        else:
            answer = await self._hybrid(body, query, history, trace_id)
            finish = "stop"
        _observed(request, answer)
        if body.stream:
            return self._sse(self._stream_done(cid, body, answer))
        return oai.completion(cid, body.model, answer.answer, finish, answer)

    async def _hybrid(
        self,
        body: oai.ChatCompletionRequest,
        query: str,
        history: list[dict[str, str]],
        trace_id: str,
    ) -> AnswerResponse:
        h = body.hybrid
        req = AnswerRequest(
            query=query,
            top_k=h.top_k,
            mode=h.mode,
            verify=h.verify,
            sensitive=h.sensitive,
            pii=h.pii,
        )
        return await self.lead.answer(
            req,
            trace_id,
            claude_down=await self._claude_down(),
            sampling=body.sampling(),
            history=history,
        )

    async def _slm_inputs(
        self, body: oai.ChatCompletionRequest, query: str, history: list[dict[str, str]]
    ) -> tuple[list[Passage], GenerationRequest]:
        passages: list[Passage] = []
        if body.hybrid.retrieval:
            passages = await self._retrieve(query, body.hybrid.top_k)
            messages = answer_messages(query, passages, history)
        else:
            messages = [*history, {"role": "user", "content": query}]
        params = {
            "max_tokens": self.cfg.slm.max_tokens,
            "temperature": self.cfg.slm.temperature,
            **body.sampling(),
        }
        return passages, GenerationRequest(messages=messages, **params)

    def _slm_answer(
        self,
        query: str,
        passages: list[Passage],
        gen: GenerationResult,
        trace_id: str,
        renumber: bool = True,
    ) -> AnswerResponse:
        if passages and renumber:
            text, citations = finalize(gen.text, passages)
        elif passages:  # streamed text can no longer change: keep the model's numbers
            text, citations = gen.text, as_numbered(gen.text, passages)
        else:
            text, citations = gen.text, []
        conf = score_answer(query, text, citations, passages, gen.token_logprobs)
        return AnswerResponse(
            answer=text,
            citations=citations,
            route="slm",
            confidence=conf.score,
            usage=Usage(
                slm_prompt_tokens=gen.prompt_tokens, slm_completion_tokens=gen.completion_tokens
            ),
            trace_id=trace_id,
        )

    async def _slm_only(
        self,
        body: oai.ChatCompletionRequest,
        query: str,
        history: list[dict[str, str]],
        trace_id: str,
    ) -> tuple[AnswerResponse, str]:
        passages, gen_req = await self._slm_inputs(body, query, history)
        gen = await self._generate(gen_req)
        finish = "length" if gen.finish_reason == "length" else "stop"
        return self._slm_answer(query, passages, gen, trace_id), finish

    async def _stream_slm(
        self,
        cid: str,
        body: oai.ChatCompletionRequest,
        query: str,
        history: list[dict[str, str]],
        request: Request,
    ) -> AsyncIterator[str]:
        passages, gen_req = await self._slm_inputs(body, query, history)
        yield oai.chunk(cid, body.model, {"role": "assistant", "content": ""})
        result: GenerationResult | None = None
        stream = self.slm.options(stream=True).generate_stream.remote(
            gen_req, trace_context=tracing.carrier()
        )
        async for item in stream:
            if isinstance(item, GenerationResult):
                result = item
            elif item:
                yield oai.chunk(cid, body.model, {"content": item})
        if result is None:
            raise APIError(503, "the SLM stream ended early; retry", "slm_stream_ended")
        answer = self._slm_answer(query, passages, result, request.state.trace_id, renumber=False)
        _observed(request, answer)
        finish = "length" if result.finish_reason == "length" else "stop"
        yield oai.chunk(cid, body.model, {}, finish, {"hybrid": oai.hybrid_extension(answer)})
        if body.stream_options and body.stream_options.include_usage:
            yield oai.usage_chunk(cid, body.model, answer)
        yield oai.DONE

    async def _stream_done(
        self, cid: str, body: oai.ChatCompletionRequest, answer: AnswerResponse
    ) -> AsyncIterator[str]:
        """The hybrid pipeline settles its text (citations, verification) before it streams."""
        yield oai.chunk(cid, body.model, {"role": "assistant", "content": ""})
        for piece in re.findall(r"\S+\s*|\s+", answer.answer):
            yield oai.chunk(cid, body.model, {"content": piece})
        yield oai.chunk(cid, body.model, {}, "stop", {"hybrid": oai.hybrid_extension(answer)})
        if body.stream_options and body.stream_options.include_usage:
            yield oai.usage_chunk(cid, body.model, answer)
        yield oai.DONE

    @staticmethod
    def _sse(events: AsyncIterator[str], error_event: str | None = None) -> StreamingResponse:
        """`error_event`: the SSE event name of an in-band error (OpenAI's streams have none)."""
        prefix = f"event: {error_event}\n" if error_event else ""

        async def guarded() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except APIError as exc:  # headers are sent: report in-band, as OpenAI does
                body = error_body(exc.status, exc.message, exc.code)
                yield f"{prefix}data: {json.dumps(body)}\n\n"
            except Exception:
                log.exception("stream failed")
                body = error_body(500, "stream failed", "internal_error")
                yield f"{prefix}data: {json.dumps(body)}\n\n"

        return StreamingResponse(
            guarded(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- documents ---------------------------------------------------------------------------

    @app.post(
        "/v1/documents",
        status_code=201,
        summary="Add or replace documents (durable on 2xx)",
        responses=error_responses(401, 413, 422, 503),
    )
    async def add_documents(
        self, body: Annotated[DocumentIn | DocumentBatch, Body()]
    ) -> dict[str, Any]:
        docs = body.documents if isinstance(body, DocumentBatch) else [body]
        new = [NewDocument(id=d.id, title=d.title, text=d.text, metadata=d.metadata) for d in docs]
        result = await self._call(self.retriever.upsert, new)
        return {"ids": result["ids"], "index_version": result["index_version"]}

    @app.get(
        "/v1/documents/{doc_id:path}",
        response_model=DocumentInfo,
        responses=error_responses(401, 404, 503),
    )
    async def get_document(self, doc_id: str) -> DocumentInfo:
        record: DocRecord | None = await self._call(self.retriever.get, doc_id, retry=True)
        if record is None:
            raise APIError(404, f"no document with id {doc_id!r}", "document_not_found")
        status = await self._call(self.retriever.status, retry=True)
        return DocumentInfo(
            id=record.id,
            title=record.title,
            metadata=record.metadata,
            chunks=len(record.chunk_ids),
            index_version=status["version"],
            text=record.text,
        )

    @app.delete("/v1/documents/{doc_id:path}", responses=error_responses(401, 404, 503))
    async def delete_document(self, doc_id: str) -> dict[str, Any]:
        result = await self._call(self.retriever.delete, [doc_id])
        if not result["deleted"]:
            raise APIError(404, f"no document with id {doc_id!r}", "document_not_found")
        return {"id": doc_id, "deleted": True, "index_version": result["index_version"]}

    @app.get("/v1/usage", summary="Totals of the cost ledger: Claude spend, SLM cost, savings")
    async def usage(self) -> dict[str, Any]:
        status = await self._call(self.claude.status, retry=True)
        totals = status.get("totals", {})
        estimate = totals.get("all_claude_cost_usd_estimate", 0.0)
        spent = totals.get("cost_usd", 0.0) + totals.get("slm_cost_usd", 0.0)
        return {
            "totals": totals,
            "budget_remaining_usd": status.get("budget_remaining_usd"),
            "circuit": status.get("circuit"),
            "saving_ratio": round(estimate / spent, 3) if spent > 0 else None,
        }

    async def status(self) -> dict[str, Any]:
        """For the deployment handle (not a route): where this replica runs."""
        return {"ready": True, "placement": placement()}

    @app.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: every deployment ready and the index loaded")
    async def readyz(self) -> JSONResponse:
        """A deployment is ready when one of its replicas answers: Serve routes only to replicas
        whose constructor finished, and an SLM replica's constructor ends with a generation. Every
        component also carries how many of its replicas crashed, so a replica that keeps dying
        shows as such rather than as starting."""
        names = ("retriever", "slm", "claude")
        handles = (self.retriever, self.slm, self.claude)

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

