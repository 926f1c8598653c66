"""Routing: decomposed, the LLM tier's, or the SLM's answer — escalated when the SLM is not
confident (`escalation.threshold`)."""

from __future__ import annotations

from hybrid_serve.agents import decompose, escalate
from hybrid_serve.agents.attempts import Attempt, slm_attempt
from hybrid_serve.agents.confidence import query_shape
from hybrid_serve.agents.context import RequestContext
from hybrid_serve.agents.services import Services
from hybrid_serve.schemas import Escalation, Passage


async def run(s: Services, ctx: RequestContext, passages: list[Passage]) -> Attempt:
    req = ctx.req
    if req.mode == "decompose" or (req.mode == "auto" and query_shape(req.query).complex):
        attempt = await decompose.run(s, ctx, passages)
        if attempt is not None:
            return attempt
    if req.mode == "claude":
        ctx.escalation = Escalation(escalated=True, reasons=["mode_claude"])
        return await escalate.llm_or_slm(s, ctx, req.query, passages)
    attempt = await ctx.within("generate", slm_attempt(s, ctx, req.query, passages))
    if req.mode == "auto" and attempt.confidence.score < s.cfg.escalation.threshold:
        return await escalate.run(s, ctx, attempt)
    return attempt
