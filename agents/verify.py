"""Verification: the LLM tier grades an answer 0–1 against the passages it cites; below the bar
the answer is tried once more with the grader's notes and the better one kept. And shadow
verification: a share of the answers kept on the SLM graded after the response has gone, to
measure the kept-answer error rate on real traffic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import replace

from hybrid_serve.agents import prompts, tracing
from hybrid_serve.agents.attempts import Attempt, llm_attempt, slm_attempt
from hybrid_serve.agents.context import RequestContext
from hybrid_serve.agents.events import VerificationEvent, text_deltas
from hybrid_serve.agents.interfaces import DeadlineExceeded, LLMRoles, Unavailable
from hybrid_serve.agents.roles import Grade
from hybrid_serve.agents.services import Services
from hybrid_serve.agents.shadow import Verdict, now
from hybrid_serve.schemas import Verification

log = logging.getLogger(__name__)


async def run(s: Services, ctx: RequestContext, attempt: Attempt) -> Attempt:
    """`attempt` verified when the LLM tier may be used: the better attempt, the verdict in ctx."""
    if ctx.llm is None:
        ctx.degrade(ctx.no_llm_reason)
        return attempt
    try:
        with tracing.span("Pipeline.verify"):
            verified, verification = await ctx.within("verify", _verify(s, ctx, ctx.llm, attempt))
            tracing.annotate(
                {
                    "hybrid.verification.score": verification.score,
                    "hybrid.verification.passed": verification.passed,
                    "hybrid.verification.attempts": verification.attempts,
                }
            )
    except Unavailable as exc:
        ctx.llm_failed("verify", exc)
        return attempt
    except DeadlineExceeded:
        ctx.cut_short("verify")
        return attempt
    if ctx.events is not None:
        if verified is not attempt:  # the retry was better: the text changed
            for delta in text_deltas(verified.text, reset=True):
                await ctx.events(delta)
        await ctx.events(VerificationEvent(verification))
    ctx.verification = verification
    return verified


async def _verify(
    s: Services, ctx: RequestContext, llm: LLMRoles, attempt: Attempt
) -> tuple[Attempt, Verification]:
    """Grade; below the bar, retry once with the grader's notes and keep the better one."""
    bar = s.cfg.escalation.verify_min_score
    query = ctx.req.query
    grade = await _grade(ctx, llm, attempt)
    if grade.score >= bar:
        return attempt, Verification(score=grade.score, passed=True, attempts=1, notes=grade.notes)
    try:
        if attempt.route == "claude":
            retry = await llm_attempt(ctx, llm, query, attempt.passages, notes=grade.notes)
        else:
            prompt = prompts.slm_retry_prompt(query, attempt.passages, attempt.text, grade.notes)
            retry = await slm_attempt(
                s, ctx, query, attempt.passages, prompt=prompt, route=attempt.route
            )
        second = await _grade(ctx, llm, retry)
    except Unavailable:
        return attempt, Verification(score=grade.score, passed=False, attempts=1, notes=grade.notes)
    best, best_grade = (retry, second) if second.score > grade.score else (attempt, grade)
    return best, Verification(
        score=best_grade.score,
        passed=best_grade.score >= bar,
        attempts=2,
        notes=best_grade.notes,
    )


async def _grade(ctx: RequestContext, llm: LLMRoles, attempt: Attempt) -> Grade:
    call = ctx.call(ctx.req.query, attempt.passages, answer=attempt.text)
    result = await llm.call("verify", call)
    ctx.count_llm(result)
    grade: Grade = result.output
    return grade.model_copy(update={"score": round(min(1.0, max(0.0, float(grade.score))), 4)})


class ShadowGrader:
    """Grades, in the background, the configured share of answers kept on the SLM by the
    threshold (mode auto, not escalated, not verified, nothing cut) of requests that may use the
    LLM tier — never a sensitive one, even with an on-premises tier: its question would go to
    the verdict log."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.random = rng or random.Random()
        self.tasks: set[asyncio.Task[None]] = set()

    def maybe(self, s: Services, ctx: RequestContext, attempt: Attempt) -> None:
        share = s.cfg.escalation.shadow_verify_share
        kept = ctx.req.mode == "auto" and attempt.route == "slm" and ctx.verification is None
        skip = ctx.llm is None or ctx.sensitive or ctx.cut or not attempt.text.strip()
        if not kept or share <= 0 or skip or self.random.random() >= share:
            return
        task = asyncio.create_task(self._grade(s, ctx, attempt))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _grade(self, s: Services, ctx: RequestContext, attempt: Attempt) -> None:
        assert ctx.llm is not None
        llm = ctx.llm
        request_id = f"{ctx.trace_id}:shadow"
        call = replace(
            ctx.call(ctx.req.query, attempt.passages, answer=attempt.text), request_id=request_id
        )
        try:
            with tracing.span("Pipeline.shadow_verify"):
                result = await llm.call("verify", call)
        except Unavailable:
            return  # budget, circuit, rate limit: no verdict, and nobody waiting for one
        except Exception:
            log.warning("shadow verification of %s failed", ctx.trace_id, exc_info=True)
            return
        finally:
            with contextlib.suppress(Exception):  # the ledger forgets a day's entries at midnight
                await llm.finish_request(request_id, 0.0, 0.0, requests=0)
        score = round(min(1.0, max(0.0, float(result.output.score))), 4)
        verdict = Verdict(
            at=now(),
            trace_id=ctx.trace_id,
            confidence=attempt.confidence.score,
            threshold=s.cfg.escalation.threshold,
            score=score,
            wrong=score < s.cfg.escalation.verify_min_score,
        )
        if s.on_verdict is not None:
            await s.on_verdict(verdict)

    async def idle(self) -> None:
        """Wait for the gradings in flight (tests; a draining replica)."""
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
