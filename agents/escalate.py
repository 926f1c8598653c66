"""Escalation: a low-confidence SLM answer is rewritten by the LLM tier and tried again, then
answered by the tier itself from the same evidence; and the tier's answer with the SLM's as the
fallback the deadline can always count on (a hedged request)."""

from __future__ import annotations

import asyncio
import math

from hybrid_serve.agents import prompts, tracing
from hybrid_serve.agents.attempts import Attempt, llm_attempt, slm_attempt
from hybrid_serve.agents.context import RequestContext
from hybrid_serve.agents.interfaces import DeadlineExceeded, LLMRoles, Unavailable
from hybrid_serve.agents.policy import KEPT_LOCAL
from hybrid_serve.agents.retrieve import search_many
from hybrid_serve.agents.roles import RewritePlan
from hybrid_serve.agents.services import Services
from hybrid_serve.schemas import Passage

# An LLM answer still pending when this share of the request's time is left gets an SLM answer
# started beside it, so the fallback does not queue behind every other one at the deadline.
HEDGE_AT_SHARE = 0.5


async def run(s: Services, ctx: RequestContext, first: Attempt) -> Attempt:
    """The best answer the escalation reaches; `first` when it may not escalate."""
    ctx.escalation.reasons = first.confidence.reasons or ["low_confidence"]
    if ctx.local_only:
        ctx.escalation.reasons.append("sensitive_kept_local")
        ctx.degrade(KEPT_LOCAL)
        return first
    if ctx.llm is None:
        ctx.degrade("claude_unavailable")
        return first
    ctx.escalation.escalated = True
    tried = [first]  # what the escalation got to, should the deadline stop it
    with tracing.span("Pipeline.escalate"):
        try:
            work = _rewrite_then_llm(s, ctx, ctx.llm, first, tried)
            attempt = await ctx.within("escalate", work)
        except DeadlineExceeded:
            ctx.cut_short("escalate")
            attempt = _best(tried)
        tracing.annotate({"hybrid.route": attempt.route})
    return attempt


def _best(tried: list[Attempt]) -> Attempt:
    return max(tried, key=lambda a: a.confidence.score)


async def _rewrite_then_llm(
    s: Services, ctx: RequestContext, llm: LLMRoles, first: Attempt, tried: list[Attempt]
) -> Attempt:
    query = ctx.req.query
    try:
        result = await llm.call("rewrite", ctx.call(query, first.passages))
    except Unavailable as exc:
        ctx.llm_failed("escalate", exc)
        return first
    ctx.count_llm(result)
    plan: RewritePlan = result.output
    queries = [plan.rewritten_query, *plan.search_queries[:3]]
    try:
        passages = await search_many(s, ctx, queries, ctx.req.top_k)
        prompt = prompts.answer_prompt(plan.rewritten_query, passages, ctx.history)
        second = await slm_attempt(s, ctx, query, passages, prompt=prompt, route="slm+rewrite")
    except Unavailable as exc:  # overloaded, a replica gone: the first answer stands
        ctx.degrade(exc.reason)
        return first
    tried.append(second)
    if second.confidence.score >= s.cfg.escalation.threshold:
        return second
    if ctx.local_only:  # the rewrite's search found sensitive documents
        ctx.escalation.reasons.append("sensitive_kept_local")
        ctx.degrade(KEPT_LOCAL)
        return _best(tried)
    try:
        return await llm_attempt(ctx, llm, query, passages)
    except Unavailable as exc:
        ctx.llm_failed("claude", exc)
        return _best(tried)


def hedge_after_s(s: Services, ctx: RequestContext) -> float:
    """How long an LLM answer runs alone before an SLM answer is started beside it."""
    timeout = ctx.deadline.timeout_s
    if timeout is None:
        return math.inf
    keep = max(s.timing.fallback_s(), HEDGE_AT_SHARE * timeout)
    return max(ctx.remaining() - keep, 0.0)


async def llm_or_slm(
    s: Services, ctx: RequestContext, query: str, passages: list[Passage]
) -> Attempt:
    """The LLM tier's answer, or the SLM's when the tier cannot give one in time. A call still
    running late in the deadline gets the SLM's answer started beside it: the fallback is in
    hand when the deadline comes however many requests fall back at once, and the tier keeps
    the whole deadline to answer."""
    if ctx.llm is None:
        ctx.degrade(ctx.no_llm_reason)
        return await ctx.within("generate", slm_attempt(s, ctx, query, passages))
    primary = asyncio.ensure_future(
        ctx.within("claude", llm_attempt(ctx, ctx.llm, query, passages))
    )
    fallback: asyncio.Future[Attempt] | None = None
    try:
        await asyncio.wait({primary}, timeout=hedge_after_s(s, ctx))
        if not primary.done():
            fallback = asyncio.ensure_future(
                ctx.within("generate", slm_attempt(s, ctx, query, passages))
            )
            await asyncio.wait({primary})  # bounded by the deadline
        try:
            return primary.result()
        except Unavailable as exc:
            ctx.llm_failed("claude", exc)
        except DeadlineExceeded:
            ctx.cut_short("claude")
        return await (fallback or ctx.within("generate", slm_attempt(s, ctx, query, passages)))
    finally:
        tasks = [t for t in (primary, fallback) if t is not None]
        for task in tasks:
            task.cancel()  # a no-op for a finished one
        # Cancelled before the response goes out: no call outlives its request; and the loser's
        # error, if it had one, is retrieved rather than logged as never retrieved.
        await asyncio.gather(*tasks, return_exceptions=True)
