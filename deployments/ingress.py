"""The HTTP ingress's core: `Ingress`, what the routers (`deployments/routers/`) share — the
pipeline, the other deployments as backends, the caller's key and the answer cache. `Ingress`
needs no Ray replica, so the routers are unit-tested over local backends; `Orchestrator`
(`orchestrator.py`) is the Serve deployment that wires it to the cluster's handles.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from hybrid_serve.agents import pricing, tracing
from hybrid_serve.agents.context import RequestOptions
from hybrid_serve.agents.interfaces import DeadlineExceeded
from hybrid_serve.agents.pipeline import Pipeline
from hybrid_serve.agents.shadow import Verdict, VerdictLog
from hybrid_serve.config import APIKey, HTTPConfig, HybridServeConfig
from hybrid_serve.deployments.errors import APIError
from hybrid_serve.deployments.handles import Backend, LLMViaBackend
from hybrid_serve.deployments.metrics import metrics, record_answer
from hybrid_serve.deployments.middleware import request_priority, request_timeout
from hybrid_serve.schemas import (
    AnswerRequest,
    AnswerResponse,
    CacheResult,
    Collections,
    GenerationRequest,
    GenerationResult,
    Passage,
    Usage,
)

log = logging.getLogger("ray.serve")
STATUS_TIMEOUT_S = 5.0
LLM_STATUS_TTL_S = 10.0
HEALTH_TTL_S = 5.0
# What `/readyz` may take in all, under the rendered manifests' probe timeout (4 s).
READYZ_BUDGET_S = 2.5
# The pipeline answers by its deadline on its own; this is the backstop for what it does not bound.
DEADLINE_GRACE_S = 1.0
# Without keys the API is open, and every caller may do everything.
OPEN_ACCESS = APIKey(key="open", name="", admin=True)


@dataclass
class CacheProbe:
    """A cache lookup that missed: what storing the answer needs."""

    key: str
    text: str
    vector: list[float]
    index_version: int
    owner: str


def access_of(keys: dict[str, APIKey], request: Request) -> APIKey | None:
    """The caller's key as configured, from the label APIKeyMiddleware put in the request; None
    for a caller without a valid key (only the open routes see one)."""
    if not keys:
        return OPEN_ACCESS
    return keys.get(getattr(request.state, "api_key", None) or "")


def request_deadline(request: Request, http: HTTPConfig, asked: float | None = None) -> float:
    """The request's deadline in seconds: `timeout_s` in the body, else the X-Request-Timeout
    header, else http.request_timeout_s; at most http.max_request_timeout_s."""
    if asked is None and (header := request.headers.get("x-request-timeout")) is not None:
        try:
            asked = request_timeout(header, http.max_request_timeout_s)
        except ValueError as exc:  # ControlHeadersMiddleware answers these first
            raise APIError(422, str(exc), "invalid_timeout") from None
    return min(asked or http.request_timeout_s, http.max_request_timeout_s)


async def bounded(work: Any, timeout_s: float, grace_s: float = 0.0) -> Any:
    """A route's work within its deadline (and `grace_s` for work that bounds itself): 504 when
    nothing is ready by then."""
    try:
        return await asyncio.wait_for(work, timeout_s + grace_s)
    except (TimeoutError, DeadlineExceeded) as exc:
        step = getattr(exc, "step", None)
        metrics.inc("hybrid_serve_deadline_exceeded_total", step=step or "request")
        raise APIError(
            504,
            f"no answer within the request's deadline of {timeout_s:g} s"
            + (f" (it ran out during {step})" if step else "")
            + "; send a longer X-Request-Timeout, or retry",
            "deadline_exceeded",
        ) from None


class Ingress:
    """What every router needs. `health(deployment)`: Serve's state and the replica crashes of a
    deployment (None outside a cluster); `verdicts`: where shadow verdicts are logged."""

    COMPONENTS = ("retriever", "slm", "claude", "answer_cache", "key_limits")

    def __init__(
        self,
        cfg: HybridServeConfig,
        retriever: Backend,
        slm: Backend,
        llm: Backend,
        cache: Backend,
        key_limits: Backend,
        verdicts: VerdictLog | None = None,
        health: Callable[[str], dict[str, Any]] | None = None,
    ) -> None:
        self.retriever, self.slm, self.llm = retriever, slm, llm
        self.cache, self.key_limits = cache, key_limits
        self.verdicts = verdicts
        self.health_of = health
        self.background: set[asyncio.Task[Any]] = set()
        self._llm_status: tuple[float, dict[str, Any]] | None = None
        self._health: dict[str, tuple[float, dict[str, Any]]] = {}
        self._health_lookups: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self.pipeline = Pipeline(
            retrieve=self._retrieve,
            generate=self._generate,
            generate_stream=self._generate_stream,
            config=cfg,
            llm=LLMViaBackend(llm),
            on_verdict=self._shadow_verdict,
            on_refuse=lambda priority: metrics.inc(
                "hybrid_serve_refusals_total", reason="on_arrival", priority=priority
            ),
        )
        self.reconfigure(cfg)

    def reconfigure(self, cfg: HybridServeConfig) -> None:
        """The tunables in force from the next request on (`Orchestrator.reconfigure`)."""
        self.cfg = cfg
        self.keys = {k.label(): k for k in cfg.http.keys()}
        self.pipeline.reconfigure(cfg)

    @property
    def policy(self) -> Any:
        return self.pipeline.services.policy

    def backends(self) -> dict[str, Backend]:
        return dict(
            zip(
                self.COMPONENTS,
                (self.retriever, self.slm, self.llm, self.cache, self.key_limits),
            )
        )

    # -- the pipeline's dependencies -------------------------------------------------------

    async def _retrieve(
        self, query: str, top_k: int, collections: Collections = None
    ) -> list[Passage]:
        return await self.retriever.call("search", query, top_k, collections, read=True)

    async def _generate(self, req: GenerationRequest) -> GenerationResult:
        return await self.slm.call("generate", req, read=True)

    def _generate_stream(self, req: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        return self.slm.stream("generate_stream", req)

    async def _shadow_verdict(self, verdict: Verdict) -> None:
        """A background grade of a kept answer: counted, and logged for `calibrate --from-log`."""
        metrics.inc(
            "hybrid_serve_shadow_verdicts_total", verdict="wrong" if verdict.wrong else "right"
        )
        if self.verdicts is not None:
            await asyncio.to_thread(self.verdicts.append, verdict)

    # -- the caller ------------------------------------------------------------------------

    def access(self, request: Request) -> APIKey:
        """The caller of a route behind the key check."""
        caller = access_of(self.keys, request)
        if caller is None:  # APIKeyMiddleware answers 401 before a route runs
            raise APIError(401, "missing or invalid API key", "invalid_api_key")
        return caller

    def deadline(self, request: Request, asked: float | None = None) -> float:
        return request_deadline(request, self.cfg.http, asked)

    async def options(
        self,
        request: Request,
        req: AnswerRequest,
        timeout_s: float,
        use_llm: bool = True,
        **fields: Any,
    ) -> RequestOptions:
        """The request's options: its key's collections, and whether the LLM tier is known to
        be unusable for it (not asked for the `slm` chat model, which never escalates)."""
        down = await self.llm_down(request) if use_llm else None
        return RequestOptions(
            req,
            llm_down=down,
            collections=self.access(request).readable(),
            timeout_s=timeout_s,
            priority=request_priority(request.headers.get("x-priority")),
            **fields,
        )

    async def llm_status(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._llm_status and now - self._llm_status[0] < LLM_STATUS_TTL_S:
            return self._llm_status[1]
        try:
            status = await asyncio.wait_for(self.llm.call("status"), STATUS_TIMEOUT_S)
        except Exception as exc:  # a dead proxy is a degraded cluster, not a failed request
            status = {"ready": False, "available": False, "reason": type(exc).__name__}
        self._llm_status = (now, status)
        return status

    async def llm_down(self, request: Request) -> str | None:
        exhausted = bool(getattr(request.state, "key_budget_exhausted", False))
        return self.policy.llm_down(await self.llm_status(), exhausted)

    async def admit(self, label: str) -> dict[str, Any]:
        """KeyLimits' verdict on a key's request (KeyLimitMiddleware)."""
        return await asyncio.wait_for(self.key_limits.call("admit", label), STATUS_TIMEOUT_S)

    def check_query(self, query: str) -> None:
        limit = self.cfg.http.max_query_chars
        if len(query) > limit:
            raise APIError(
                422, f"query is {len(query)} characters; the limit is {limit}", "query_too_long"
            )

    # -- bookkeeping -----------------------------------------------------------------------

    def later(self, work: Any) -> None:
        """Bookkeeping the response does not wait for (cache stores, key usage)."""

        async def run() -> None:
            try:
                await work
            except Exception as exc:
                log.warning("background %s failed: %s", type(work).__name__, exc)

        task = asyncio.create_task(run())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def count_key(self, request: Request, answer: AnswerResponse, saved: float) -> None:
        label = getattr(request.state, "api_key", None)
        if label is None:
            return
        u = answer.usage
        hit = answer.cache == "hit"
        self.later(self.key_limits.call("record", label, u.cost_usd, u.slm_cost_usd, saved, hit))

    # -- the answer cache ------------------------------------------------------------------

    async def probe(
        self, request: Request, options: RequestOptions, scope: str
    ) -> tuple[CacheProbe | None, AnswerResponse | None]:
        """The cached answer to the request, asked under `scope` (Policy.cache_scope), or the
        probe to store a new one by (None when the request may not use the cache)."""
        req = options.req
        no_cache = "no-cache" in request.headers.get("cache-control", "").lower()
        if not self.policy.may_use_cache(req, no_cache):
            request.state.cache = "bypass"
            return None, None
        try:
            vector, version = await self.retriever.call("embed_versioned", req.query, read=True)
            found = await self.cache.call("lookup", scope, req.query, vector, version)
        except APIError:
            raise
        except Exception as exc:  # the cache is an optimisation: without it, answer afresh
            log.warning("answer cache unavailable: %s", type(exc).__name__)
            request.state.cache = "bypass"
            return None, None
        owner = self.access(request).label() if self.keys else ""
        if found is None:
            request.state.cache = "miss"
            return CacheProbe(scope, req.query, vector, version, owner), None
        answer, similarity, question, stored_by = found
        cached = AnswerResponse.model_validate(answer)
        saved = pricing.saved_usd(cached)
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
        tracing.annotate({"hybrid.cache": "hit", "hybrid.cache.similarity": similarity})
        hit = cached.model_copy(update=update)
        self.count_key(request, hit, saved)
        return None, hit

    def observed(
        self,
        request: Request,
        answer: AnswerResponse,
        probe: CacheProbe | None = None,
        llm_down: str | None = None,
    ) -> AnswerResponse:
        """The answer's metrics and its outcome for the request's log line and span; a fresh
        answer is cached (when policy lets it) and counted against the client's key."""
        cache: CacheResult = getattr(request.state, "cache", "bypass")
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
        self.count_key(request, answer, 0.0)
        if probe is not None and self.policy.may_keep(answer, llm_down):
            self.later(
                self.cache.call(
                    "store",
                    probe.key,
                    probe.text,
                    probe.vector,
                    answer.model_dump(mode="json"),
                    probe.index_version,
                    pricing.saved_usd(answer),
                    probe.owner,
                )
            )
        return answer

    # -- health ----------------------------------------------------------------------------

    async def component(self, name: str, backend: Backend) -> dict[str, Any]:
        """A deployment's status for `/readyz`, within READYZ_BUDGET_S whatever it is doing:
        a Kubernetes probe that times out counts as a failure."""
        started = time.monotonic()
        try:
            status = await asyncio.wait_for(backend.call("status"), READYZ_BUDGET_S)
        except Exception as exc:
            status = {"ready": False, "error": type(exc).__name__}
        left = READYZ_BUDGET_S - (time.monotonic() - started)
        health = await self._health_of(backend.name, max(left, 0.0))
        if health.get("restarts"):
            status.update(restarts=health["restarts"], last_death=health["last_death"])
        if not status.get("ready"):
            status["state"] = not_ready_state(health)
        return status

    async def _health_of(self, deployment: str, wait_s: float) -> dict[str, Any]:
        """Looked up at most every few seconds (probes come often; the actor table is
        cluster-wide), in the background: a slow lookup is waited for `wait_s` at most, and the
        last one known is used meanwhile."""
        if self.health_of is None:
            return {}
        cached = self._health.get(deployment)
        if cached and time.monotonic() - cached[0] < HEALTH_TTL_S:
            return cached[1]
        lookup = self._health_lookups.get(deployment)
        if lookup is None:
            lookup = asyncio.create_task(self._look_up_health(deployment))
            self._health_lookups[deployment] = lookup
        try:
            return await asyncio.wait_for(asyncio.shield(lookup), wait_s)
        except TimeoutError:
            return cached[1] if cached else {}

    async def _look_up_health(self, deployment: str) -> dict[str, Any]:
        assert self.health_of is not None
        try:
            health = await asyncio.to_thread(self.health_of, deployment)
            self._health[deployment] = (time.monotonic(), health)
            return health
        finally:
            del self._health_lookups[deployment]


# The replica's Ingress. Serve sends the FastAPI app to the replica inside its ingress class, a
# copy of the one the module holds, so the replica's Ingress is found here, not on an app.
_installed: Ingress | None = None


def install(ing: Ingress) -> None:
    global _installed
    _installed = ing


def current(state: Any) -> Ingress | None:
    """An app's own Ingress (unit tests set one), else the replica's."""
    return getattr(state, "ingress", None) or _installed


def shared(request: Request) -> Ingress:
    """The routers' dependency: the replica's `Ingress`."""
    ing = current(request.app.state)
    if ing is None:
        raise APIError(
            503, "the ingress is starting; retry shortly", "starting", {"Retry-After": "2"}
        )
    return ing


Shared = Annotated[Ingress, Depends(shared)]


def not_ready_state(health: dict[str, Any]) -> str:
    status = health.get("status", "unknown")
    if status == "DEPLOY_FAILED":
        return "failed to start: " + health.get("message", "see the Ray logs")
    if health.get("restarts"):
        return f"restarting: {health['restarts']} replica crash(es), last: {health['last_death']}"
    if status == "UNHEALTHY":
        return "unhealthy: " + health.get("message", "health checks failing")
    return "starting"
