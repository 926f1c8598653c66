"""Decomposition: a complex question (several in one, a comparison; or `mode: decompose`) is
planned — by the LLM tier, or the local planner when the tier cannot or may not — into sub-tasks
that SLM sub-agents answer in parallel, each from its own retrieval, and their cited answers are
merged into one."""

from __future__ import annotations

from collections.abc import Sequence

from hybrid_serve.agents import tracing
from hybrid_serve.agents.attempts import Attempt, slm_attempt
from hybrid_serve.agents.confidence import Confidence
from hybrid_serve.agents.context import RequestContext
from hybrid_serve.agents.events import PlanEvent, SubtaskEvent
from hybrid_serve.agents.interfaces import DeadlineExceeded, Unavailable
from hybrid_serve.agents.merge import PartialAnswer, merge
from hybrid_serve.agents.planner import Plan, SubtaskPlan, local_plan, validate_plan
from hybrid_serve.agents.retrieve import search_many
from hybrid_serve.agents.services import Services
from hybrid_serve.agents.subagent import run_plan
from hybrid_serve.schemas import Passage, Subtask

# Who planned, as the plan event and the trace say it.
LLM_PLANNER, LOCAL_PLANNER = "claude", "local"


async def run(s: Services, ctx: RequestContext, passages: list[Passage]) -> Attempt | None:
    """Plan, run the sub-agents, merge. None when `auto` finds nothing to split (or only the
    local planner would, and escalation.auto_local_plan is off: README, routing table)."""
    plan, planner, planner_down = await _plan(s, ctx, passages)
    auto = ctx.req.mode == "auto"
    if auto and (
        len(plan.subtasks) < 2
        or (planner == LOCAL_PLANNER and not s.cfg.escalation.auto_local_plan)
    ):
        return None
    ctx.escalation.escalated = planner == LLM_PLANNER
    ctx.escalation.reasons = ["complex_query" if auto else "mode_decompose"]
    if planner == LOCAL_PLANNER:
        ctx.escalation.reasons.append("local_planner")
        if ctx.local_only:
            ctx.escalation.reasons.append("sensitive_kept_local")
        ctx.degrade(planner_down)
    if ctx.events is not None:
        await ctx.events(PlanEvent(planner, [st.model_dump() for st in plan.subtasks]))

    async def one(st: SubtaskPlan, question: str, queries: list[str]) -> PartialAnswer:
        return await _subtask(s, ctx, st, question, queries)

    async def done(part: PartialAnswer) -> None:
        if ctx.events is not None:
            await ctx.events(SubtaskEvent(as_subtask(part)))

    parts = await run_plan(plan, one, s.cfg.escalation.subtask_timeout_s, done)
    if ctx.remaining() <= 0 and any(p.status == "timeout" for p in parts):
        if not any(p.status == "ok" for p in parts):
            raise DeadlineExceeded("subtasks")
        ctx.cut_short("subtasks")
    return merged(parts, ctx.req.top_k)


async def _plan(s: Services, ctx: RequestContext, passages: list[Passage]) -> tuple[Plan, str, str]:
    """(plan, planner, why the LLM tier did not plan): the tier's plan, or the local planner's."""
    plan: Plan | None = None
    planner_down = ctx.no_llm_reason
    with tracing.span("Pipeline.plan"):
        if ctx.llm is not None:
            try:
                call = ctx.llm.call("plan", ctx.call(ctx.req.query, passages))
                result = await ctx.within("plan", call, reserve_s=s.timing.fallback_s())
                ctx.count_llm(result)
                plan = validate_plan(result.output)
            except Unavailable as exc:
                planner_down = exc.reason
            except DeadlineExceeded:
                ctx.cut_short("plan")
                planner_down = "deadline"
        planner = LLM_PLANNER if plan is not None and plan.subtasks else LOCAL_PLANNER
        if plan is None or planner == LOCAL_PLANNER:
            plan = local_plan(ctx.req.query)
        tracing.annotate({"hybrid.planner": planner, "hybrid.subtasks": len(plan.subtasks)})
    return plan, planner, planner_down


async def _subtask(
    s: Services, ctx: RequestContext, st: SubtaskPlan, question: str, queries: list[str]
) -> PartialAnswer:
    """One sub-agent: its own retrieval, its own SLM answer."""
    attributes = {"hybrid.subtask.id": st.id, "hybrid.subtask.depends_on": st.depends_on}
    with tracing.span("Pipeline.subtask", attributes=attributes):
        try:
            found = await ctx.within(
                "subtasks", search_many(s, ctx, [*queries, question], ctx.req.top_k)
            )
            a = await ctx.within("subtasks", slm_attempt(s, ctx, question, found))
        except DeadlineExceeded:
            raise TimeoutError("the request's deadline") from None  # reported as timeout
        tracing.annotate({"hybrid.confidence": a.confidence.score})
    return PartialAnswer(
        st.id,
        question,
        a.text,
        a.citations,
        a.sources,
        passages=found,
        confidence=a.confidence.score,
    )


def merged(parts: Sequence[PartialAnswer], top_k: int) -> Attempt:
    """The sub-agents' answers as one attempt: merged text and citations, the evidence behind
    them plus each sub-agent's best passages, confidence from how much was answered."""
    ok = [p for p in parts if p.status == "ok"]
    failures = [p.exception for p in parts if p.exception is not None]
    if not ok and failures:
        raise failures[0]  # nothing answered and something broke: the caller's error
    text, citations, sources = merge(parts)
    seen = {p.key for p in sources}
    evidence = list(sources)
    for p in (p for part in ok for p in part.passages):
        if p.key not in seen and len(evidence) < len(sources) + top_k:
            seen.add(p.key)
            evidence.append(p)
    answered = len(ok) / len(parts)
    confidence = Confidence(
        score=round(sum(p.confidence for p in ok) / len(parts), 4),
        signals={"answered": round(answered, 4)},
        reasons=[] if answered == 1 else ["subtasks_missing"],
    )
    return Attempt(
        text,
        citations,
        evidence,
        confidence,
        "decomposed",
        sources,
        subtasks=[as_subtask(p) for p in parts],
    )


def as_subtask(part: PartialAnswer) -> Subtask:
    return Subtask(
        id=part.id,
        question=part.question,
        answer=part.text,
        citations=part.citations,
        latency_ms=part.latency_ms,
        status=part.status,
    )
