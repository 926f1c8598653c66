"""The lead agent: one request from query to cited answer. Pure asyncio; the orchestrator deployment
gives it Ray handles as plain async callables, so tests give it local ones.

    retrieve → SLM answers → confidence ≥ threshold?  yes → (verify?) → answer
                                   │ no (and not sensitive, mode auto)
                                   ▼
                  Claude rewrites/plans → retrieve again → SLM answers  ("slm+rewrite")
                                   │ still below the threshold
                                   ▼
                  Claude answers from the evidence                      ("claude")

A complex query (several questions, a comparison; or `mode: decompose`) goes another way: Claude
(or the local planner) writes a plan, SLM sub-agents answer its sub-tasks in parallel, each from its
own retrieval, and their cited answers are merged ("decomposed") and then verified.

Policies are code here, not prompt text: nothing a passage says can change them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agents import prompts, tracing
from agents.citations import finalize_sources
from agents.claude import ClaudeResult, ClaudeUnavailable, Grade, RewritePlan, estimate_tokens
from agents.confidence import Confidence, query_shape, score_answer
from agents.merge import PartialAnswer, merge
from agents.planner import Plan, SubtaskPlan, local_plan, validate_plan
from agents.schemas import (
    AnswerRequest,
    AnswerResponse,
    Citation,
    Escalation,
    GenerationRequest,
    GenerationResult,
    Passage,
    Route,
    Subtask,
    Usage,
    Verification,
)
from agents.subagent import run_plan
from retrieval.fusion import reciprocal_rank_fusion

Retrieve = Callable[[str, int], Awaitable[list[Passage]]]
Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]
# Progress for a streaming client: (event name, JSON-able data). Names: plan, subtask, answer,
# verification; the caller sends `done` with the response.
Emit = Callable[[str, dict[str, Any]], Awaitable[None]]


class ClaudePort(Protocol):
    """What the lead needs of ClaudeProxy; raises ClaudeUnavailable when Claude can't be used."""

    async def rewrite(
        self, request_id: str, query: str, passages: Sequence[Passage], pii: str
    ) -> ClaudeResult: ...

    async def plan(
        self, request_id: str, query: str, passages: Sequence[Passage], pii: str
    ) -> ClaudeResult: ...

    async def verify(
        self, request_id: str, query: str, answer: str, passages: Sequence[Passage], pii: str
    ) -> ClaudeResult: ...

    async def answer(
        self, request_id: str, query: str, passages: Sequence[Passage], pii: str, notes: str = ""
    ) -> ClaudeResult: ...

    async def finish_request(
        self, request_id: str, slm_cost_usd: float, all_claude_estimate_usd: float
    ) -> None: ...


@dataclass
class LeadSettings:
    max_tokens: int = 160
    temperature: float = 0.0
    threshold: float = 0.5
    verify: str = "auto"
    verify_min_score: float = 0.7
    pii: str = "redact"
    sensitive_patterns: list[str] = field(default_factory=list)
    sensitive_tags: list[str] = field(default_factory=list)
    claude_input_usd_per_mtok: float = 3.0
    claude_output_usd_per_mtok: float = 15.0
    slm_usd_per_hour: float = 0.0
    subtask_timeout_s: float = 60.0


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


@dataclass
class _Ledger:
    """What one request used, summed over every call it made."""

    usage: Usage = field(default_factory=Usage)
    slm_seconds: float = 0.0
    # Per-request generation settings, carried with the request's accounting.
    sampling: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)

    def slm(self, gen: GenerationResult) -> None:
        self.usage.slm_prompt_tokens += gen.prompt_tokens
        self.usage.slm_completion_tokens += gen.completion_tokens
        self.slm_seconds += gen.seconds

    def claude(self, result: ClaudeResult) -> None:
        u = self.usage
        cu = result.usage
        u.claude_input_tokens += cu.input_tokens
        u.claude_output_tokens += cu.output_tokens
        u.claude_cache_read_tokens += cu.cache_read_tokens
        u.claude_cache_write_tokens += cu.cache_write_tokens
        u.claude_calls += cu.attempts
        u.cost_usd = round(u.cost_usd + cu.cost_usd, 8)


class Lead:
    def __init__(
        self,
        retrieve: Retrieve,
        generate: Generate,
        settings: LeadSettings,
        claude: ClaudePort | None = None,
    ) -> None:
        self.retrieve = retrieve
        self.generate = generate
        self.settings = settings
        self.claude = claude
        self._sensitive = [re.compile(p, re.IGNORECASE) for p in settings.sensitive_patterns]

    # -- policy ----------------------------------------------------------------------------

    def is_sensitive(self, req: AnswerRequest, passages: Sequence[Passage]) -> bool:
        if req.sensitive:
            return True
        if any(p.search(req.query) for p in self._sensitive):
            return True
        tags = set(self.settings.sensitive_tags)
        return any(tags.intersection(p.tags) for p in passages)

    def wants_verification(self, req: AnswerRequest, attempt: Attempt) -> bool:
        policy = req.verify or self.settings.verify
        if policy == "always":
            return True
        if policy == "never":
            return False
        return attempt.route != "slm"

    # -- the request -----------------------------------------------------------------------

    async def answer(
        self,
        req: AnswerRequest,
        trace_id: str,
        claude_down: str | None = None,
        sampling: dict[str, Any] | None = None,
        history: Sequence[dict[str, str]] = (),
        emit: Emit | None = None,
    ) -> AnswerResponse:
        """`claude_down`: a reason Claude is known to be unusable (e.g. no API key).
        `sampling`: GenerationRequest fields a client set (max_tokens, temperature, ...).
        `history`: earlier chat turns, context for the SLM's prompt.
        `emit`: progress events for a streaming client."""
        attributes = {"hybrid.mode": req.mode, "hybrid.top_k": req.top_k}
        with tracing.span("Lead.answer", attributes=attributes):
            response = await self._answer(req, trace_id, claude_down, sampling, history, emit)
            tracing.annotate(answer_attributes(response))
            return response

    async def _answer(
        self,
        req: AnswerRequest,
        trace_id: str,
        claude_down: str | None,
        sampling: dict[str, Any] | None,
        history: Sequence[dict[str, str]],
        emit: Emit | None,
    ) -> AnswerResponse:
        degraded = [claude_down] if claude_down else []
        ledger = _Ledger(sampling=dict(sampling or {}), history=list(history))
        passages = await self.retrieve(req.query, req.top_k)
        sensitive = self.is_sensitive(req, passages)
        tracing.annotate({"hybrid.sensitive": sensitive})
        pii = req.pii or self.settings.pii
        claude = None if sensitive or claude_down else self.claude
        escalation = Escalation()
        attempt: Attempt | None = None

        if req.mode == "decompose" or (req.mode == "auto" and query_shape(req.query).complex):
            attempt = await self._decompose(
                claude, trace_id, req, passages, pii, ledger, degraded, escalation, sensitive, emit
            )
            if attempt is not None and self.is_sensitive(req, attempt.passages):
                sensitive, claude = True, None  # a sub-agent found sensitive evidence
        if attempt is None and req.mode == "claude":
            escalation.escalated = True
            escalation.reasons = ["mode_claude"]
            attempt = await self._claude_or_slm(
                claude, trace_id, req.query, passages, pii, ledger, degraded, sensitive
            )
        elif attempt is None:
            attempt = await self._slm_attempt(req.query, req.query, passages, ledger)
            low = attempt.confidence.score < self.settings.threshold
            if req.mode == "auto" and low:
                escalation.reasons = attempt.confidence.reasons or ["low_confidence"]
                if sensitive:
                    escalation.reasons.append("sensitive_kept_local")
                    _add(degraded, "sensitive_local_only")
                elif claude is None:
                    _add(degraded, "claude_unavailable")
                else:
                    escalation.escalated = True
                    with tracing.span("Lead.escalate"):
                        attempt = await self._escalate(
                            claude, trace_id, req, attempt, pii, ledger, degraded
                        )
                        tracing.annotate({"hybrid.route": attempt.route})

        subtasks = attempt.subtasks
        await _emit_text(emit, attempt.text)
        verification = None
        if self.wants_verification(req, attempt):
            if claude is None:
                _add(degraded, "sensitive_local_only" if sensitive else "claude_unavailable")
            else:
                try:
                    with tracing.span("Lead.verify"):
                        verified, verification = await self._verify(
                            claude, trace_id, req.query, attempt, pii, ledger
                        )
                        tracing.annotate(
                            {
                                "hybrid.verification.score": verification.score,
                                "hybrid.verification.passed": verification.passed,
                                "hybrid.verification.attempts": verification.attempts,
                            }
                        )
                except ClaudeUnavailable as exc:
                    _add(degraded, exc.reason)
                else:
                    if verified is not attempt:  # the retry was better: the text changed
                        await _emit_text(emit, verified.text, reset=True)
                    attempt = verified
                    if emit is not None:
                        await emit("verification", verification.model_dump())

        usage = ledger.usage
        usage.slm_cost_usd = round(ledger.slm_seconds * self.settings.slm_usd_per_hour / 3600, 8)
        usage.all_claude_cost_usd_estimate = self.all_claude_estimate(
            req.query, passages, attempt.text
        )
        if self.claude is not None and not claude_down:
            try:
                await self.claude.finish_request(
                    trace_id, usage.slm_cost_usd, usage.all_claude_cost_usd_estimate
                )
            except Exception:  # the ledger's totals are best effort; the answer is not
                _add(degraded, "ledger_unavailable")
        return AnswerResponse(
            answer=attempt.text,
            citations=attempt.citations,
            route=attempt.route,
            confidence=attempt.confidence.score,
            escalation=escalation,
            verification=verification,
            subtasks=subtasks,
            usage=usage,
            degraded=degraded,
            trace_id=trace_id,
        )

    def all_claude_estimate(self, query: str, passages: Sequence[Passage], answer: str) -> float:
        """Claude alone: its answer prompt with the same evidence, and an answer this long."""
        s = self.settings
        tokens_in = estimate_tokens(
            prompts.CLAUDE_ANSWER_SYSTEM + prompts.claude_answer_user(query, passages)
        )
        tokens_out = max(estimate_tokens(answer), 20)
        cost = tokens_in * s.claude_input_usd_per_mtok + tokens_out * s.claude_output_usd_per_mtok
        return round(cost / 1e6, 8)

    # -- steps -----------------------------------------------------------------------------

    async def _slm_attempt(
        self,
        query: str,
        asked: str,
        passages: list[Passage],
        ledger: _Ledger,
        messages: list[dict[str, str]] | None = None,
        route: Route = "slm",
    ) -> Attempt:
        params = {
            "max_tokens": self.settings.max_tokens,
            "temperature": self.settings.temperature,
            "stop": prompts.ANSWER_STOP,
            **ledger.sampling,
        }
        gen = await self.generate(
            GenerationRequest(
                messages=messages or prompts.answer_messages(asked, passages, ledger.history),
                **params,
            )
        )
        ledger.slm(gen)
        text, citations, sources = finalize_sources(gen.text, passages)
        confidence = score_answer(query, text, citations, passages, gen.token_logprobs)
        return Attempt(text, citations, passages, confidence, route, sources)

    async def _claude_attempt(
        self,
        claude: ClaudePort,
        trace_id: str,
        query: str,
        passages: list[Passage],
        pii: str,
        ledger: _Ledger,
        notes: str = "",
    ) -> Attempt:
        result = await claude.answer(trace_id, query, passages, pii, notes)
        ledger.claude(result)
        text, citations, sources = finalize_sources(str(result.output), passages)
        confidence = score_answer(query, text, citations, passages, None)
        return Attempt(text, citations, passages, confidence, "claude", sources)

    async def _claude_or_slm(
        self,
        claude: ClaudePort | None,
        trace_id: str,
        query: str,
        passages: list[Passage],
        pii: str,
        ledger: _Ledger,
        degraded: list[str],
        sensitive: bool,
    ) -> Attempt:
        if claude is not None:
            try:
                return await self._claude_attempt(claude, trace_id, query, passages, pii, ledger)
            except ClaudeUnavailable as exc:
                _add(degraded, exc.reason)
        else:
            _add(degraded, "sensitive_local_only" if sensitive else "claude_unavailable")
        return await self._slm_attempt(query, query, passages, ledger)

    async def _escalate(
        self,
        claude: ClaudePort,
        trace_id: str,
        req: AnswerRequest,
        first: Attempt,
        pii: str,
        ledger: _Ledger,
        degraded: list[str],
    ) -> Attempt:
        try:
            result = await claude.rewrite(trace_id, req.query, first.passages, pii)
        except ClaudeUnavailable as exc:
            _add(degraded, exc.reason)
            return first
        ledger.claude(result)
        plan: RewritePlan = result.output
        queries = [plan.rewritten_query, *plan.search_queries[:3]]
        passages = await self._retrieve_many(queries, req.top_k)
        second = await self._slm_attempt(
            req.query, plan.rewritten_query, passages, ledger, route="slm+rewrite"
        )
        if second.confidence.score >= self.settings.threshold:
            return second
        try:
            return await self._claude_attempt(claude, trace_id, req.query, passages, pii, ledger)
        except ClaudeUnavailable as exc:
            _add(degraded, exc.reason)
            return max(first, second, key=lambda a: a.confidence.score)

    async def _decompose(
        self,
        claude: ClaudePort | None,
        trace_id: str,
        req: AnswerRequest,
        passages: list[Passage],
        pii: str,
        ledger: _Ledger,
        degraded: list[str],
        escalation: Escalation,
        sensitive: bool,
        emit: Emit | None,
    ) -> Attempt | None:
        """Plan, run the sub-agents, merge. None when `auto` finds nothing to split."""
        plan: Plan | None = None
        planner_down = "sensitive_local_only" if sensitive else "claude_unavailable"
        with tracing.span("Lead.plan"):
            if claude is not None:
                try:
                    result = await claude.plan(trace_id, req.query, passages, pii)
                    ledger.claude(result)
                    plan = validate_plan(result.output)
                except ClaudeUnavailable as exc:
                    planner_down = exc.reason
            planner = "claude" if plan is not None and plan.subtasks else "local"
            if planner == "local":
                plan = local_plan(req.query)
            assert plan is not None
            tracing.annotate({"hybrid.planner": planner, "hybrid.subtasks": len(plan.subtasks)})
        if req.mode == "auto" and len(plan.subtasks) < 2:
            return None

        escalation.escalated = planner == "claude"
        escalation.reasons = ["mode_decompose" if req.mode == "decompose" else "complex_query"]
        if planner == "local":
            escalation.reasons.append("local_planner")
            if sensitive:
                escalation.reasons.append("sensitive_kept_local")
            _add(degraded, planner_down)
        if emit is not None:
            steps = [st.model_dump() for st in plan.subtasks]
            await emit("plan", {"planner": planner, "subtasks": steps})

        async def run(st: SubtaskPlan, question: str, queries: list[str]) -> PartialAnswer:
            attributes = {"hybrid.subtask.id": st.id, "hybrid.subtask.depends_on": st.depends_on}
            with tracing.span("Lead.subtask", attributes=attributes):
                found = await self._retrieve_many([*queries, question], req.top_k)
                a = await self._slm_attempt(question, question, found, ledger)
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

        async def done(part: PartialAnswer) -> None:
            if emit is not None:
                await emit("subtask", _subtask(part).model_dump())

        parts = await run_plan(plan, run, self.settings.subtask_timeout_s, done)
        ok = [p for p in parts if p.status == "ok"]
        failures = [p.exception for p in parts if p.exception is not None]
        if not ok and failures:
            raise failures[0]  # nothing answered and something broke: the caller's error
        text, citations, sources = merge(parts)
        seen = {p.chunk_id for p in sources}
        evidence = list(sources)
        for p in (p for part in ok for p in part.passages):
            if p.chunk_id not in seen and len(evidence) < len(sources) + req.top_k:
                seen.add(p.chunk_id)
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
            subtasks=[_subtask(p) for p in parts],
        )

    async def _retrieve_many(self, queries: Sequence[str], top_k: int) -> list[Passage]:
        """Every query's hits fused by reciprocal rank, de-duplicated by chunk."""
        unique = list(dict.fromkeys(q.strip() for q in queries if q.strip()))
        lists = await asyncio.gather(*(self.retrieve(q, top_k) for q in unique))
        by_id = {p.chunk_id: p for hits in lists for p in hits}
        fused = reciprocal_rank_fusion([[p.chunk_id for p in hits] for hits in lists])
        return [by_id[cid] for cid, _ in fused[:top_k]]

    async def _verify(
        self,
        claude: ClaudePort,
        trace_id: str,
        query: str,
        attempt: Attempt,
        pii: str,
        ledger: _Ledger,
    ) -> tuple[Attempt, Verification]:
        """Grade; below the bar, retry once with the grader's notes and keep the better one."""
        bar = self.settings.verify_min_score
        grade = await self._grade(claude, trace_id, query, attempt, pii, ledger)
        if grade.score >= bar:
            return attempt, Verification(
                score=grade.score, passed=True, attempts=1, notes=grade.notes
            )
        try:
            if attempt.route == "claude":
                retry = await self._claude_attempt(
                    claude, trace_id, query, attempt.passages, pii, ledger, notes=grade.notes
                )
            else:
                messages = prompts.slm_retry_messages(
                    query, attempt.passages, attempt.text, grade.notes
                )
                retry = await self._slm_attempt(
                    query, query, attempt.passages, ledger, messages=messages, route=attempt.route
                )
            second = await self._grade(claude, trace_id, query, retry, pii, ledger)
        except ClaudeUnavailable:
            return attempt, Verification(
                score=grade.score, passed=False, attempts=1, notes=grade.notes
            )
        best, best_grade = (retry, second) if second.score > grade.score else (attempt, grade)
        return best, Verification(
            score=best_grade.score,
            passed=best_grade.score >= bar,
            attempts=2,
            notes=best_grade.notes,
        )

    async def _grade(
        self,
        claude: ClaudePort,
        trace_id: str,
        query: str,
        attempt: Attempt,
        pii: str,
        ledger: _Ledger,
    ) -> Grade:
        result = await claude.verify(trace_id, query, attempt.text, attempt.passages, pii)
        ledger.claude(result)
        grade: Grade = result.output
        clamp = min(1.0, max(0.0, float(grade.score)))
        return grade.model_copy(update={"score": round(clamp, 4)})


def answer_attributes(response: AnswerResponse) -> dict[str, Any]:
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


def _subtask(part: PartialAnswer) -> Subtask:
    return Subtask(
        id=part.id,
        question=part.question,
        answer=part.text,
        citations=part.citations,
        latency_ms=part.latency_ms,
        status=part.status,  # type: ignore[arg-type]
    )


async def _emit_text(emit: Emit | None, text: str, reset: bool = False) -> None:
    """The settled answer as deltas (word by word); `reset` replaces what was sent before."""
    if emit is None:
        return
    if reset:
        await emit("answer", {"reset": True, "delta": ""})
    for piece in re.findall(r"\S+\s*|\s+", text):
        await emit("answer", {"delta": piece})


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)
