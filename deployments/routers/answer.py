"""`POST /v1/answer` (the whole pipeline, whole or streamed) and `POST /v1/search` (the fused
ranking alone)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from hybrid_serve.agents.context import RequestOptions
from hybrid_serve.agents.events import EventSink, replay
from hybrid_serve.deployments import sse
from hybrid_serve.deployments.errors import error_responses
from hybrid_serve.deployments.ingress import (
    DEADLINE_GRACE_S,
    CacheProbe,
    Ingress,
    Shared,
    bounded,
)
from hybrid_serve.schemas import AnswerRequest, AnswerResponse, SearchRequest, SearchResponse

router = APIRouter()


@router.post(
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
async def answer(body: AnswerRequest, request: Request, ing: Shared) -> Any:
    timeout = ing.deadline(request, body.timeout_s)
    ing.check_query(body.query)
    options = await ing.options(request, body, timeout)
    scope = ing.policy.cache_scope("answer", body, options.llm_down, options.collections)
    probe, hit = await ing.probe(request, options, scope)
    if body.stream:
        return await _stream(ing, request, options, probe, hit)
    if hit is not None:
        return ing.observed(request, hit)
    work = ing.pipeline.answer(options, request.state.trace_id)
    response = await bounded(work, timeout, DEADLINE_GRACE_S)
    return ing.observed(request, response, probe, options.llm_down)


async def _stream(
    ing: Ingress,
    request: Request,
    options: RequestOptions,
    probe: CacheProbe | None,
    hit: AnswerResponse | None,
) -> StreamingResponse:
    """Events as the pipeline makes progress (a cached answer replays the same kinds). Nothing
    is sent until the first event, so a request that fails early (overload, index not ready)
    still gets its HTTP status; one that reaches its deadline after that ends with an in-band
    `error` event."""

    async def run(events: EventSink) -> dict[str, Any]:
        if hit is not None:
            for event in replay(hit):
                await events(event)
            return ing.observed(request, hit).model_dump(mode="json")
        work = ing.pipeline.answer(options, request.state.trace_id, events)
        response = await bounded(work, options.timeout_s or 0.0, DEADLINE_GRACE_S)
        return ing.observed(request, response, probe, options.llm_down).model_dump(mode="json")

    items = sse.emitted(run)
    first = await anext(items)

    async def body() -> AsyncIterator[str]:
        yield _sse(first)
        async for item in items:
            yield _sse(item)

    return sse.response(body(), error_event="error")


def _sse(item: Any) -> str:
    if isinstance(item, sse.Done):
        return sse.event(item.result, "done")
    return sse.named(item)


@router.post(
    "/v1/search",
    response_model=SearchResponse,
    summary="Retrieval only: the fused ranking the answers are built from",
    responses=error_responses(401, 413, 422, 503, 504),
)
async def search(body: SearchRequest, request: Request, ing: Shared) -> SearchResponse:
    ing.check_query(body.query)
    readable = ing.access(request).readable()
    work = ing.retriever.call("search_versioned", body.query, body.top_k, readable, read=True)
    passages, version = await bounded(work, ing.deadline(request))
    return SearchResponse(passages=passages, index_version=version)
