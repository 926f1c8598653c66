"""The lead agent: one request from query to cited answer. Pure asyncio; the orchestrator deployment
gives it Ray handles as plain async callables, so tests give it local ones."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agents.citations import finalize
from agents.confidence import score_answer
from agents.prompts import answer_messages
from agents.schemas import (
    AnswerRequest,
    AnswerResponse,
    GenerationRequest,
    GenerationResult,
    Passage,
    Usage,
)

Retrieve = Callable[[str, int], Awaitable[list[Passage]]]
Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]


@dataclass
class LeadSettings:
    max_tokens: int = 160
    temperature: float = 0.0


class Lead:
    def __init__(self, retrieve: Retrieve, generate: Generate, settings: LeadSettings) -> None:
        self.retrieve = retrieve
        self.generate = generate
        self.settings = settings

    async def answer(
        self, req: AnswerRequest, trace_id: str, degraded: list[str] | None = None
    ) -> AnswerResponse:
        passages = await self.retrieve(req.query, req.top_k)
        gen = await self.generate(
            GenerationRequest(
                messages=answer_messages(req.query, passages),
                max_tokens=self.settings.max_tokens,
                temperature=self.settings.temperature,
            )
        )
        text, citations = finalize(gen.text, passages)
        confidence = score_answer(text, citations, passages, gen.token_logprobs)
        return AnswerResponse(
            answer=text,
            citations=citations,
            route="slm",
            confidence=confidence.score,
            usage=Usage(
                slm_prompt_tokens=gen.prompt_tokens,
                slm_completion_tokens=gen.completion_tokens,
            ),
            degraded=list(degraded or []),
            trace_id=trace_id,
        )
