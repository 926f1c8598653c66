"""The chat APIs as one service: OpenAI's `POST /v1/chat/completions` (and `GET /v1/models`) and
Anthropic's `POST /v1/messages`. Both reduce a request to a `Chat` — the last user message as the
question, the turns before it as history, the `hybrid` options, the sampling the client set — and
differ only in their wire shapes (`deployments/openai_api.py`, `deployments/anthropic_api.py`).
Model `hybrid` runs the whole pipeline (its text settled before it streams); model `slm` the small
model alone, streamed token by token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request

from hybrid_serve.agents.context import RequestOptions
from hybrid_serve.agents.events import AnswerDelta, EventSink, text_deltas
from hybrid_serve.deployments import anthropic_api as aapi
from hybrid_serve.deployments import openai_api as oai
from hybrid_serve.deployments import sse
from hybrid_serve.deployments.errors import (
    MESSAGES_PATH,
    APIError,
    MessagesErrorBody,
    error_responses,
)
from hybrid_serve.deployments.ingress import DEADLINE_GRACE_S, CacheProbe, Ingress, Shared, bounded
from hybrid_serve.schemas import AnswerRequest, AnswerResponse

router = APIRouter()
STREAMING: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}}
}


@dataclass
class Chat:
    """A chat request of either API, reduced to what the pipeline needs."""

    model: str
    req: AnswerRequest
    history: list[dict[str, str]]
    retrieval: bool
    sampling: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        model: str,
        turns: list[dict[str, str]],
        h: oai.HybridOptions,
        sampling: dict[str, Any],
    ) -> Chat:
        """The last user message as the request; the turns before it as its history (what
        follows it, such as an assistant prefill, is not used)."""
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
        return cls(model, req, turns[:last], h.retrieval, sampling)


def check_chat(ing: Ingress, messages: int, max_tokens: list[int | None], texts: list[str]) -> None:
    """The configured limits: every token ceiling a client set, not only the one in effect (the
    OpenAI API has two)."""
    http = ing.cfg.http
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
        ing.check_query(text)


class ChatService:
    """One chat request through the pipeline, for either API."""

    def __init__(self, ing: Ingress, request: Request, chat: Chat) -> None:
        self.ing, self.request, self.chat = ing, request, chat
        self.timeout = ing.deadline(request)

    async def _options(self) -> RequestOptions:
        c = self.chat
        return await self.ing.options(
            self.request,
            c.req,
            self.timeout,
            use_llm=c.model == "hybrid",
            sampling=c.sampling,
            history=c.history,
        )

    def _scope(self, options: RequestOptions) -> str:
        c = self.chat
        return self.ing.policy.cache_scope(
            "chat",
            c.req,
            options.llm_down,
            options.collections,
            c.history,
            model=c.model,
            retrieval=c.retrieval,
            sampling=c.sampling,
        )

    async def whole(self) -> tuple[AnswerResponse, oai.Finish]:
        """The answer, whole (the hybrid pipeline settles its text before it streams)."""
        ing, options = self.ing, await self._options()
        probe, hit = await ing.probe(self.request, options, self._scope(options))
        if hit is not None:
            return ing.observed(self.request, hit), "stop"
        trace_id = self.request.state.trace_id
        finish: oai.Finish = "stop"
        if self.chat.model == "slm":
            slm = ing.pipeline.answer_slm(options, trace_id, retrieval=self.chat.retrieval)
            answer, finish = await bounded(slm, self.timeout, DEADLINE_GRACE_S)
        else:
            whole = ing.pipeline.answer(options, trace_id)
            answer = await bounded(whole, self.timeout, DEADLINE_GRACE_S)
        return ing.observed(self.request, answer, probe, options.llm_down), finish

    async def slm_stream(self) -> AsyncIterator[str | tuple[AnswerResponse, oai.Finish]]:
        """The `slm` model's text as it writes it, then (answer, finish); a cached answer as
        one delta."""
        ing, options = self.ing, await self._options()
        probe, hit = await ing.probe(self.request, options, self._scope(options))
        if hit is not None:
            yield hit.answer
            yield ing.observed(self.request, hit), "stop"
            return
        async for item in self._run_slm(options, probe):
            yield item

    async def _run_slm(
        self, options: RequestOptions, probe: CacheProbe | None
    ) -> AsyncIterator[str | tuple[AnswerResponse, oai.Finish]]:
        ing, request = self.ing, self.request

        async def run(events: EventSink) -> tuple[AnswerResponse, oai.Finish]:
            work = ing.pipeline.answer_slm(
                options, request.state.trace_id, events, retrieval=self.chat.retrieval
            )
            return await bounded(work, self.timeout, DEADLINE_GRACE_S)

        async for item in sse.emitted(run):
            if isinstance(item, AnswerDelta):
                yield item.delta
            elif isinstance(item, sse.Done):
                answer, finish = item.result
                yield ing.observed(request, answer, probe), finish


@router.get("/v1/models", summary="Models (OpenAI-compatible)")
async def models() -> dict[str, Any]:
    return oai.models_list()


@router.post(
    "/v1/chat/completions",
    summary="Chat completions (OpenAI-compatible; `hybrid` extension field)",
    description="With `stream: true`, Server-Sent Events of chat.completion.chunk objects, "
    "ending with `data: [DONE]`.",
    responses={**error_responses(401, 404, 413, 422, 503, 504), **STREAMING},
)
async def chat_completions(body: oai.ChatCompletionRequest, request: Request, ing: Shared) -> Any:
    check_chat(ing, len(body.messages), [body.max_tokens, body.max_completion_tokens], body.texts())
    turns = [{"role": m.role, "content": m.text()} for m in body.messages]
    service = ChatService(ing, request, Chat.of(body.model, turns, body.hybrid, body.sampling()))
    chunks = oai.Chunks(oai.completion_id(), body.model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.model == "slm" and body.stream:
        items = service.slm_stream()
        first = await anext(items)  # an early failure still gets its HTTP status
        return sse.response(_openai_chunks(chunks, first, items, include_usage))
    answer, finish = await service.whole()
    if body.stream:
        settled = _openai_chunks(chunks, answer.answer, _done(answer, finish), include_usage)
        return sse.response(settled)
    return oai.completion(chunks.cid, body.model, finish, answer)


async def _done(answer: AnswerResponse, finish: oai.Finish) -> AsyncIterator[Any]:
    yield answer, finish


async def _openai_chunks(
    chunks: oai.Chunks, first: Any, rest: AsyncIterator[Any], include_usage: bool
) -> AsyncIterator[str]:
    """Text deltas (a settled text word by word), then the final chunk with the `hybrid`
    extension, the usage chunk if asked, and [DONE]."""
    yield chunks.delta("", role=True)
    async for item in _chain(first, rest):
        if isinstance(item, str):
            for piece in _pieces(item):
                yield chunks.delta(piece)
        else:
            answer, finish = item
            yield chunks.final(finish, answer)
            if include_usage:
                yield chunks.usage(answer)
    yield sse.DONE


def _pieces(text: str) -> Iterable[str]:
    return (d.delta for d in text_deltas(text))


@router.post(
    MESSAGES_PATH,
    summary="Messages (Anthropic Messages API; `hybrid` extension field)",
    description="The `anthropic` SDK's `messages.create` with `base_url` set to the cluster. "
    "With `stream: true`, Server-Sent Events as the Messages API sends them (message_start, "
    "content_block_start/delta/stop, message_delta, message_stop; `error` in-band).",
    responses={
        **error_responses(401, 404, 413, 422, 429, 503, 504, model=MessagesErrorBody),
        **STREAMING,
    },
)
async def messages(body: aapi.MessagesRequest, request: Request, ing: Shared) -> Any:
    check_chat(ing, len(body.messages), [body.max_tokens], body.texts())
    sampling = body.sampling()
    if body.model == "hybrid":
        # max_tokens is required here, so clients send a generous ceiling (1024 is common): the
        # pipeline keeps its own shorter SLM answers under it.
        sampling["max_tokens"] = min(body.max_tokens, ing.cfg.slm.max_tokens)
    service = ChatService(ing, request, Chat.of(body.model, body.turns(), body.hybrid, sampling))
    events = aapi.Events(aapi.message_id(), body.model)
    if body.model == "slm" and body.stream:
        items = service.slm_stream()
        first = await anext(items)
        stream = _message_events(events, first, items)
        return sse.response(stream, error_event="error", path=MESSAGES_PATH)
    answer, finish = await service.whole()
    reason = aapi.stop_reason(finish)
    if body.stream:
        stream = _iterate(events.settled(answer, reason))
        return sse.response(stream, error_event="error", path=MESSAGES_PATH)
    return aapi.message(events.mid, body.model, answer, reason)


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The item already taken (to fail before any byte was sent), then the rest."""
    yield first
    async for item in rest:
        yield item


async def _iterate(items: Iterable[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


async def _message_events(
    events: aapi.Events, first: Any, rest: AsyncIterator[Any]
) -> AsyncIterator[str]:
    """The `slm` model's tokens as one text block; its citations follow as citations_delta
    events once they are known, before the block closes."""
    yield events.start()
    yield events.open_block()
    async for item in _chain(first, rest):
        if isinstance(item, str):
            yield events.text(item)
        else:
            answer, finish = item
            for event in events.citations(aapi.locations(answer, answer.answer)):
                yield event
            yield events.close_block()
            for event in events.finish(answer, aapi.stop_reason(finish)):
                yield event
