"""An attempt at an answer — the SLM's or the LLM tier's — with its citations settled and its
confidence scored. Every stage that answers makes one here."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from hybrid_serve.agents import prompts
from hybrid_serve.agents.citations import as_numbered, content_words, finalize_sources
from hybrid_serve.agents.confidence import Confidence, score_answer
from hybrid_serve.agents.context import PROMPT_TRIMMED, RequestContext
from hybrid_serve.agents.events import AnswerDelta
from hybrid_serve.agents.interfaces import LLMRoles, Unavailable
from hybrid_serve.agents.services import Services
from hybrid_serve.schemas import (
    Citation,
    GenerationRequest,
    GenerationResult,
    Passage,
    Route,
    Subtask,
)
from hybrid_serve.text import split_sentences

Finish = Literal["stop", "length"]


@dataclass
class Attempt:
    text: str
    citations: list[Citation]
    passages: list[Passage]
    confidence: Confidence
    route: Route
    # The passage behind each citation number, for merging answers by chunk.
    sources: list[Passage] = field(default_factory=list)
    subtasks: list[Subtask] = field(default_factory=list)
    finish_reason: Finish = "stop"


async def slm_attempt(
    s: Services,
    ctx: RequestContext,
    query: str,
    passages: list[Passage],
    prompt: prompts.Prompt | None = None,
    route: Route = "slm",
    chat: bool = False,
    stream: bool = False,
) -> Attempt:
    """The SLM's answer from `passages`. `chat`: the `slm` chat model: no answer stop sequences,
    and a text with nothing to cite stays as written. `stream`: tokens go out as they come, so
    their citation numbers can no longer change."""
    params = {
        "max_tokens": s.cfg.slm.max_tokens,
        "temperature": s.cfg.slm.temperature,
        "stop": [] if chat else prompts.ANSWER_STOP,
        "repetition_detection": None if chat else s.cfg.slm.repetition_detection,
        "max_recited_words": None if chat else s.cfg.slm.max_recited_words,
        **ctx.options.sampling,  # what the client set wins
    }
    prompt = prompt or prompts.answer_prompt(query, passages, ctx.history)
    gen_req = ctx.slm_request(
        messages=prompt.messages, evidence=prompt.evidence, evidence_at=prompt.evidence_at, **params
    )
    # The answer prompt's layout (passages, labels) may be echoed; a plain chat's cannot.
    layout = not (chat and not passages)
    started = time.monotonic()
    if stream:
        gen = await _streamed(s, ctx, gen_req, passages if layout else None)
    else:
        gen = await s.generate(gen_req)
    s.timing.observe(time.monotonic() - started)
    ctx.count_slm(gen)
    if gen.evidence_used is not None or gen.history_dropped:
        # The prompt was fitted to the SLM's context: the answer can cite only what it saw.
        ctx.degrade(PROMPT_TRIMMED)
        if gen.evidence_used is not None:
            passages = passages[: gen.evidence_used]
    raw, echoed = prompts.strip_echo(gen.text, passages) if layout else (gen.text, False)
    sources: list[Passage] = []
    if stream:
        text, citations = raw, as_numbered(raw, passages)
    elif not layout:
        text, citations = raw, []
    else:
        text, citations, sources = finalize_sources(raw, passages)
    confidence = score_answer(
        query,
        text,
        citations,
        passages,
        gen.token_logprobs,
        echoed,
        looped=gen.finish_reason == "repetition",
        recited=gen.finish_reason == "recitation",
    )
    finish: Finish = "length" if gen.finish_reason == "length" else "stop"
    return Attempt(text, citations, passages, confidence, route, sources, finish_reason=finish)


async def _streamed(
    s: Services,
    ctx: RequestContext,
    gen_req: GenerationRequest,
    passages: Sequence[Passage] | None,
) -> GenerationResult:
    """The SLM's tokens out as they come; with `passages`, through the echo filter, so what is
    sent is what the answer will be."""
    if s.generate_stream is None or ctx.events is None:
        raise RuntimeError("streaming needs generate_stream and an event sink")
    echo = prompts.EchoFilter(passages) if passages is not None else None
    result: GenerationResult | None = None
    async for item in s.generate_stream(gen_req):
        if isinstance(item, GenerationResult):
            result = item
        elif item:
            out = echo.push(item) if echo is not None else item
            if out:
                await ctx.events(AnswerDelta(out))
    if result is None:
        raise Unavailable("slm_stream_ended", "the SLM stream ended early; retry", 1.0)
    rest = echo.flush() if echo is not None else ""
    if rest:
        await ctx.events(AnswerDelta(rest))
    return result


async def llm_attempt(
    ctx: RequestContext,
    llm: LLMRoles,
    query: str,
    passages: list[Passage],
    notes: str = "",
) -> Attempt:
    """The LLM tier's answer from the same evidence, under the same citation rules."""
    result = await llm.call("answer", ctx.call(query, passages, notes=notes))
    ctx.count_llm(result)
    if result.passages_used is not None:
        passages = passages[: result.passages_used]  # it can cite only what it saw
    text, citations, sources = finalize_sources(str(result.output), passages)
    confidence = score_answer(query, text, citations, passages, None)
    return Attempt(text, citations, passages, confidence, "claude", sources)


# Sentences an extractive answer quotes, and how many of the best passages it reads.
EXTRACT_SENTENCES = 2
EXTRACT_PASSAGES = 5


def extractive_attempt(query: str, passages: list[Passage]) -> Attempt:
    """The cheaper route when the SLM cannot answer in time and the request allows it
    (`overload: extract`): the sentences of the best passages that share the most content words
    with the question, quoted in passage order, each cited. No generation: linear in the
    passages read, which are at most EXTRACT_PASSAGES."""
    asked = content_words(query)
    scored: list[tuple[float, int, int, str]] = []
    for rank, passage in enumerate(passages[:EXTRACT_PASSAGES]):
        for position, sentence in enumerate(split_sentences(passage.text)):
            shared = len(asked & content_words(sentence))
            if shared:
                scored.append((-shared, rank, position, sentence))
    best = sorted(sorted(scored)[:EXTRACT_SENTENCES], key=lambda t: (t[1], t[2]))
    if not best and passages:
        first = split_sentences(passages[0].text)
        best = [(0, 0, 0, first[0])] if first else []
    raw = " ".join(f"{sentence} [{rank + 1}]" for _, rank, _, sentence in best)
    text, citations, sources = finalize_sources(raw, passages)
    confidence = score_answer(query, text, citations, passages, None)
    return Attempt(text, citations, passages, confidence, "extractive", sources)
