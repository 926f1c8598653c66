"""The response: the answer with what the request cost and what it went through; the ledger
hears about it too."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hybrid_serve.agents import pricing
from hybrid_serve.agents.attempts import Attempt
from hybrid_serve.agents.context import RESPONSE_MARGIN_S, RequestContext
from hybrid_serve.agents.services import Services
from hybrid_serve.schemas import AnswerResponse, Deadline, Passage


async def run(
    s: Services, ctx: RequestContext, passages: Sequence[Passage], attempt: Attempt
) -> AnswerResponse:
    usage = ctx.usage
    usage.slm_cost_usd = pricing.slm_cost(ctx.slm_seconds, s.cfg.cost.slm_gpu_hour_usd)
    usage.all_claude_cost_usd_estimate = pricing.all_llm_estimate(
        s.cfg.llm, ctx.req.query, passages, attempt.text
    )
    if s.llm is not None and not ctx.options.llm_down:
        try:  # bookkeeping may use the margin kept for the response, not more
            await asyncio.wait_for(
                s.llm.finish_request(
                    ctx.trace_id, usage.slm_cost_usd, usage.all_claude_cost_usd_estimate
                ),
                max(ctx.remaining(), 0.0) + RESPONSE_MARGIN_S / 2,
            )
        except Exception:  # the ledger's totals are best effort; the answer is not
            ctx.degrade("ledger_unavailable")
    timeout = ctx.deadline.timeout_s
    return AnswerResponse(
        answer=attempt.text,
        citations=attempt.citations,
        route=attempt.route,
        confidence=attempt.confidence.score,
        escalation=ctx.escalation,
        verification=ctx.verification,
        subtasks=attempt.subtasks,
        usage=usage,
        degraded=ctx.degraded,
        sensitive=ctx.sensitive,
        searched_query=ctx.searched_query,
        deadline=(
            None
            if timeout is None
            else Deadline(timeout_s=timeout, used_s=ctx.deadline.used_s(), cut=ctx.cut)
        ),
        trace_id=ctx.trace_id,
    )


def attributes(response: AnswerResponse) -> dict[str, Any]:
    """What a trace shows of an answer: why it went where it went and what it cost."""
    u = response.usage
    return {
        "hybrid.route": response.route,
        "hybrid.confidence": response.confidence,
        "hybrid.escalated": response.escalation.escalated,
        "hybrid.escalation.reasons": response.escalation.reasons,
        "hybrid.degraded": response.degraded,
        "hybrid.verification.score": (
            response.verification.score if response.verification else None
        ),
        "hybrid.subtasks": len(response.subtasks),
        "hybrid.cost_usd": u.cost_usd,
        "hybrid.slm_cost_usd": u.slm_cost_usd,
        "hybrid.all_claude_cost_usd_estimate": u.all_claude_cost_usd_estimate,
        "hybrid.claude.calls": u.claude_calls,
        "gen_ai.usage.input_tokens": u.slm_prompt_tokens + u.claude_input_tokens,
        "gen_ai.usage.output_tokens": u.slm_completion_tokens + u.claude_output_tokens,
        "hybrid.claude.cache_read_tokens": u.claude_cache_read_tokens,
    }
