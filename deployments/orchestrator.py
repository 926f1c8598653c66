"""Orchestrator: the HTTP ingress. Validates, hands the request to the lead agent, shapes errors."""

import asyncio
import re
import secrets
import time
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from agents.claude import ClaudeResult, ClaudeUnavailable
from agents.lead import Lead, LeadSettings
from agents.schemas import (
    AnswerRequest,
    AnswerResponse,
    DocumentBatch,
    DocumentIn,
    DocumentInfo,
    GenerationRequest,
    GenerationResult,
    Passage,
)
from cluster import __version__
from cluster.config import HTTPConfig, HybridServeConfig
from deployments.errors import APIError, BodyLimitMiddleware, install_error_handlers
from deployments.retriever import IndexNotReady
from retrieval.store import DocRecord, NewDocument

app = FastAPI(
    title="hybrid-serve",
    version=__version__,
    description="Retrieval-grounded answers from a small model, with Claude when it adds value.",
)
install_error_handlers(app)
app.state.max_body_bytes = HTTPConfig().max_body_bytes
app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: app.state.max_body_bytes)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
STATUS_TIMEOUT_S = 5.0
CLAUDE_STATUS_TTL_S = 10.0


def _trace_id(request: Request) -> str:
    """Continue the caller's W3C trace when it sends one, else start a new trace id."""
    match = _TRACEPARENT.match(request.headers.get("traceparent", "").strip().lower())
    if match and match.group(1) != "0" * 32:
        return match.group(1)
    return secrets.token_hex(16)


def _cause(exc: BaseException) -> BaseException:
    """The exception raised inside a replica, unwrapped from Ray's RayTaskError."""
    return getattr(exc, "cause", None) or exc


class ClaudeViaHandle:
    """The lead's ClaudePort over the ClaudeProxy handle: errors come back as ClaudeUnavailable."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as exc:
            cause = _cause(exc)
            if isinstance(cause, ClaudeUnavailable):
                raise ClaudeUnavailable(cause.reason, cause.detail) from None
            # The proxy itself is gone or broken: the request goes on without Claude.
            raise ClaudeUnavailable("claude_unavailable", type(cause).__name__) from None

    async def rewrite(self, request_id: str, query: str, passages: Any, pii: str) -> ClaudeResult:
        return await self._call("rewrite", request_id, query, passages, pii)

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
            ),
        )
        self._claude_status: tuple[float, dict[str, Any]] | None = None
        app.state.max_body_bytes = self.cfg.http.max_body_bytes

    # -- calls to other deployments, with their failures mapped to HTTP ---------------------

    async def _call(self, response: Any) -> Any:
        try:
            return await response
        except BackPressureError as exc:
            raise APIError(
                503, "the cluster is at capacity; retry shortly", "overloaded", {"Retry-After": "2"}
            ) from exc
        except Exception as exc:
            if isinstance(_cause(exc), IndexNotReady):
                raise APIError(
                    503, f"{_cause(exc)}; retry shortly", "index_not_ready", {"Retry-After": "5"}
                ) from exc
            raise

    async def _retrieve(self, query: str, top_k: int) -> list[Passage]:
        return await self._call(self.retriever.search.remote(query, top_k))

    async def _generate(self, req: GenerationRequest) -> GenerationResult:
        return await self._call(self.slm.generate.remote(req))

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

    # -- routes --------------------------------------------------------------------------------

    @app.post(
        "/v1/answer",
        response_model=AnswerResponse,
        summary="Answer a question with citations",
        responses={413: {}, 422: {}, 503: {}},
    )
    async def answer(self, body: AnswerRequest, request: Request) -> AnswerResponse:
        request.state.trace_id = trace_id = _trace_id(request)
        limit = self.cfg.http.max_query_chars
        if len(body.query) > limit:
            raise APIError(
                422,
                f"query is {len(body.query)} characters; the limit is {limit}",
                "query_too_long",
            )
        status = await self._claude()
        # Only a missing key is known ahead; a circuit or budget is checked call by call.
        down = (
            "claude_unavailable"
            if status.get("reason") in ("no_api_key",) or not status.get("ready", True)
            else None
        )
        return await self.lead.answer(body, trace_id, claude_down=down)

    @app.post("/v1/documents", status_code=201, summary="Add or replace documents (durable on 2xx)")
    async def add_documents(
        self, body: Annotated[DocumentIn | DocumentBatch, Body()]
    ) -> dict[str, Any]:
        docs = body.documents if isinstance(body, DocumentBatch) else [body]
        new = [NewDocument(id=d.id, title=d.title, text=d.text, metadata=d.metadata) for d in docs]
        result = await self._call(self.retriever.upsert.remote(new))
        return {"ids": result["ids"], "index_version": result["index_version"]}

    @app.get("/v1/documents/{doc_id:path}", response_model=DocumentInfo)
    async def get_document(self, doc_id: str) -> DocumentInfo:
        record: DocRecord | None = await self._call(self.retriever.get.remote(doc_id))
        if record is None:
            raise APIError(404, f"no document with id {doc_id!r}", "document_not_found")
        status = await self._call(self.retriever.status.remote())
        return DocumentInfo(
            id=record.id,
            title=record.title,
            metadata=record.metadata,
            chunks=len(record.chunk_ids),
            index_version=status["version"],
            text=record.text,
        )

    @app.delete("/v1/documents/{doc_id:path}")
    async def delete_document(self, doc_id: str) -> dict[str, Any]:
        result = await self._call(self.retriever.delete.remote([doc_id]))
        if not result["deleted"]:
            raise APIError(404, f"no document with id {doc_id!r}", "document_not_found")
        return {"id": doc_id, "deleted": True, "index_version": result["index_version"]}

    @app.get("/v1/usage", summary="Totals of the cost ledger: Claude spend, SLM cost, savings")
    async def usage(self) -> dict[str, Any]:
        status = await self._call(self.claude.status.remote())
        totals = status.get("totals", {})
        estimate = totals.get("all_claude_cost_usd_estimate", 0.0)
        spent = totals.get("cost_usd", 0.0) + totals.get("slm_cost_usd", 0.0)
        return {
            "totals": totals,
            "budget_remaining_usd": status.get("budget_remaining_usd"),
            "circuit": status.get("circuit"),
            "saving_ratio": round(estimate / spent, 3) if spent > 0 else None,
        }

    @app.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: every deployment ready and the index loaded")
    async def readyz(self) -> JSONResponse:
        names = ("retriever", "slm", "claude")
        handles = (self.retriever, self.slm, self.claude)

        async def one(handle: DeploymentHandle) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(handle.status.remote(), STATUS_TIMEOUT_S)
            except Exception as exc:
                return {"ready": False, "error": type(exc).__name__}

        results = await asyncio.gather(*(one(h) for h in handles))
        components = dict(zip(names, results))
        ready = all(c.get("ready") for c in components.values())
        return JSONResponse(
            {"ready": ready, "version": __version__, "components": components},
            status_code=200 if ready else 503,
            headers=None if ready else {"Retry-After": "5"},
        )
