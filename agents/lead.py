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
import contextlib
import inspect
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from hybrid_serve.agents import prompts, tracing
from hybrid_serve.agents.citations import as_numbered, finalize_sources
from hybrid_serve.agents.claude import (
    ClaudeCall,
    ClaudeResult,
    ClaudeRoles,
    ClaudeUnavailable,
    Grade,
    RewritePlan,
    estimate_tokens,
)
from hybrid_serve.agents.confidence import Confidence, query_shape, score_answer
from hybrid_serve.agents.followup import is_follow_up, parse_condensed, with_previous
from hybrid_serve.agents.merge import PartialAnswer, merge
from hybrid_serve.agents.planner import Plan, SubtaskPlan, local_plan, validate_plan
from hybrid_serve.agents.policy import KEPT_LOCAL, Sensitivity, history_in_use
from hybrid_serve.agents.shadow import Verdict, now
from hybrid_serve.agents.subagent import run_plan
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.retrieval.fusion import reciprocal_rank_fusion
from hybrid_serve.schemas import (
    AnswerRequest,
    AnswerResponse,
    Citation,
    Collections,
    Deadline,
    Escalation,
    GenerationRequest,
    GenerationResult,
    Passage,
    PIIHandling,
    Route,
    Subtask,
    Usage,
    Verification,
)

# (query, top_k, the collections the caller may read: None for all) -> ranked passages
Retrieve = Callable[[str, int, Collections], Awaitable[list[Passage]]]
Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]
# Text deltas, then the GenerationResult (an SLM deployment's `generate_stream`).
GenerateStream = Callable[[GenerationRequest], AsyncIterator[str | GenerationResult]]
# Progress for a streaming client: (event name, JSON-able data). Names: plan, subtask, answer,
# verification; the caller sends `done` with the response.
Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
# Where a shadow verification's verdict goes (the orchestrator: a log and a metric).
OnVerdict = Callable[[Verdict], Awaitable[None]]
T = TypeVar("T")
log = logging.getLogger(__name__)
# Kept back from the deadline for writing the response and the ledger's bookkeeping.
RESPONSE_MARGIN_S = 0.25
# An SLM answer's time before any was measured (SmolLM2 on 2 CPU cores: about 2 s).
SLM_ANSWER_S_PRIOR = 3.0
# A Claude answer still pending when this share of the request's time is left gets an SLM answer
# started beside it, so the fallback does not queue behind every other one at the deadline.
HEDGE_AT_SHARE = 0.5


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
    finish_reason: Literal["stop", "length"] = "stop"


@dataclass
class RequestContext:
    """One request as it moves through the lead: what was asked, what policy lets it use, and
    what it has used so far. `claude` is None once Claude may not be used for this request (it is
    down, or the request turned out sensitive)."""

    req: AnswerRequest
    trace_id: str
    pii: PIIHandling
    claude: ClaudeRoles | None
    claude_down: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    emit: Emit | None = None
    sensitive: bool = False
    on_premises: bool = False  # the LLM tier runs inside the cluster (claude.on_premises)
    degraded: list[str] = field(default_factory=list)
    escalation: Escalation = field(default_factory=Escalation)
    verification: Verification | None = None
    usage: Usage = field(default_factory=Usage)
    slm_seconds: float = 0.0
    # The deadline, as wall-clock time (it crosses processes with Claude's calls).
    timeout_s: float | None = None
    started: float = field(default_factory=time.time)
    cut: list[str] = field(default_factory=list)
    searched_query: str | None = None
    condensed_by: str | None = None
    collections: Collections = None  # what the caller's key may read (None: every collection)

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_s is None else self.started + self.timeout_s

    def remaining(self) -> float:
        """Seconds left for work, keeping back what sending the response takes."""
        if self.deadline is None:
            return math.inf
        return self.deadline - time.time() - RESPONSE_MARGIN_S

    async def within(self, step: str, work: Awaitable[T], reserve_s: float = 0.0) -> T:
        """`work` bounded by what remains of the deadline, less `reserve_s` kept for what must
        follow it: cancelled, and DeadlineExceeded raised, when that runs out (the cancellation
        reaches other deployments' calls too)."""
        left = self.remaining() - reserve_s
        if left == math.inf:
            return await work
        if left <= 0:
            if inspect.iscoroutine(work):
                work.close()
            raise DeadlineExceeded(step)
        timer = asyncio.timeout(left)
        try:
            async with timer:
                return await work
        except TimeoutError:
            if timer.expired():
                raise DeadlineExceeded(step) from None
            raise

    def cut_short(self, step: str) -> None:
        """A step skipped or stopped to answer in time."""
        if step not in self.cut:
            self.cut.append(step)
        self.degrade("deadline")

    def degrade(self, reason: str) -> None:
        if reason not in self.degraded:
            self.degraded.append(reason)

    def claude_failed(self, step: str, exc: ClaudeUnavailable) -> None:
        """A Claude step that gave nothing: cut short when the deadline stopped it (whether the
        lead's timer or the proxy noticed first), kept local when the privacy gate refused it,
        degraded with its reason otherwise."""
        if exc.reason == "deadline":
            self.cut_short(step)
            return
        if exc.reason == KEPT_LOCAL:
            self.keep_local()
        self.degrade(exc.reason)

    def keep_local(self) -> None:
        """A sensitive request: nothing about it leaves the cluster. An on-premises LLM tier is
        inside it, so the request may still escalate there."""
        self.sensitive = True
        if not self.on_premises:
            self.claude = None

    @property
    def local_only(self) -> bool:
        """Sensitive, and the LLM tier is outside the cluster."""
        return self.sensitive and not self.on_premises

    @property
    def no_claude_reason(self) -> str:
        return KEPT_LOCAL if self.local_only else "claude_unavailable"

    def call(
        self, query: str, passages: Sequence[Passage], answer: str = "", notes: str = ""
    ) -> ClaudeCall:
        return ClaudeCall(
            self.trace_id,
            query,
            passages,
            self.pii,
            answer=answer,
            notes=notes,
            deadline=self.deadline,
            sensitive=self.sensitive,
        )

    def count_slm(self, gen: GenerationResult) -> None:
        self.usage.slm_prompt_tokens += gen.prompt_tokens
        self.usage.slm_completion_tokens += gen.completion_tokens
        self.slm_seconds += gen.seconds

    def count_claude(self, result: ClaudeResult) -> None:
        u, cu = self.usage, result.usage
        u.claude_input_tokens += cu.input_tokens
        u.claude_output_tokens += cu.output_tokens
        u.claude_cache_read_tokens += cu.cache_read_tokens
        u.claude_cache_write_tokens += cu.cache_write_tokens
        u.claude_calls += cu.attempts
        u.cost_usd = round(u.cost_usd + cu.cost_usd, 8)
        u.llm_tier = "on_premises" if self.on_premises else "hosted"
        u.llm_model = result.model


class DeadlineExceeded(Exception):
    """The request's deadline ran out in `step` with no answer to return."""

    def __init__(self, step: str) -> None:
        super().__init__(f"the deadline ran out during {step}")
        self.step = step


class Lead:
    def __init__(
        self,
        retrieve: Retrieve,
        generate: Generate,
        config: HybridServeConfig,
        claude: ClaudeRoles | None = None,
        generate_stream: GenerateStream | None = None,
        on_verdict: OnVerdict | None = None,
    ) -> None:
        self.retrieve = retrieve
        self.generate = generate
        self.generate_stream = generate_stream
        self.cfg = config
        self.claude = claude
        self.on_verdict = on_verdict
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._random = random.Random()
        self.sensitivity = Sensitivity(config.policies)
        # What an SLM answer takes here, end to end (a moving average): the time a step that
        # may fall back to the SLM leaves for it before the deadline.
        self.slm_answer_s = SLM_ANSWER_S_PRIOR

    def slm_fallback_s(self) -> float:
        """Time kept back for an SLM answer when a Claude step may have to be replaced by one."""
        return 1.5 * self.slm_answer_s

    # -- policy ----------------------------------------------------------------------------

    def wants_verification(self, req: AnswerRequest, attempt: Attempt) -> bool:
        policy = req.verify or self.cfg.escalation.verify
        if policy == "always":
            return True
        if policy == "never":
            return False
        return attempt.route != "slm"

    def _context(
        self,
        req: AnswerRequest,
        trace_id: str,
        claude_down: str | None,
        sampling: dict[str, Any] | None,
        history: Sequence[dict[str, str]],
        emit: Emit | None,
        timeout_s: float | None,
        collections: Collections = None,
    ) -> RequestContext:
        ctx = RequestContext(
            timeout_s=timeout_s,
            req=req,
            trace_id=trace_id,
            pii=req.pii or self.cfg.policies.pii,
            claude=None if claude_down else self.claude,
            claude_down=claude_down,
            sampling=dict(sampling or {}),
            history=list(history),
            emit=emit,
            degraded=[claude_down] if claude_down else [],
            on_premises=self.cfg.claude.on_premises,
            collections=collections,
        )
        if self.sensitivity.request(req):
            ctx.keep_local()
        return ctx

    async def _search(self, ctx: RequestContext, query: str, top_k: int) -> list[Passage]:
        """Every retrieval a request makes goes through here: within the collections its key
        may read, and a passage of a sensitive document makes the request sensitive from then
        on."""
        passages = await self.retrieve(query, top_k, ctx.collections)
        if self.sensitivity.passages(passages):
            ctx.keep_local()
        return passages

    # -- the request -----------------------------------------------------------------------

    async def answer(
        self,
        req: AnswerRequest,
        trace_id: str,
        claude_down: str | None = None,
        sampling: dict[str, Any] | None = None,
        history: Sequence[dict[str, str]] = (),
        emit: Emit | None = None,
        timeout_s: float | None = None,
        collections: Collections = None,
    ) -> AnswerResponse:
        """`claude_down`: a reason Claude is known to be unusable (e.g. no API key).
        `sampling`: GenerationRequest fields a client set (max_tokens, temperature, ...).
        `history`: earlier chat turns, context for the SLM's prompt.
        `emit`: progress events for a streaming client.
        `timeout_s`: the deadline: later steps are cut short to answer by then; DeadlineExceeded
        when not even a first answer is ready.
        `collections`: what the caller may read (None: every collection)."""
        ctx = self._context(
            req, trace_id, claude_down, sampling, history, emit, timeout_s, collections
        )
        attributes = {"hybrid.mode": req.mode, "hybrid.top_k": req.top_k}
        with tracing.span("Lead.answer", attributes=attributes):
            req = await self._standalone(ctx)
            passages = await ctx.within("retrieve", self._search(ctx, req.query, req.top_k))
            tracing.annotate({"hybrid.sensitive": ctx.sensitive})
            attempt = await self._route(ctx, passages)
            await _emit_text(ctx.emit, attempt.text)
            if self.wants_verification(req, attempt):
                attempt = await self._verification(ctx, attempt)
            response = await self._respond(ctx, passages, attempt)
            tracing.annotate(answer_attributes(response))
            self._maybe_shadow(ctx, attempt)
            return response

    async def answer_slm(
        self,
        req: AnswerRequest,
        trace_id: str,
        retrieval: bool = True,
        sampling: dict[str, Any] | None = None,
        history: Sequence[dict[str, str]] = (),
        emit: Emit | None = None,
        timeout_s: float | None = None,
        collections: Collections = None,
    ) -> tuple[AnswerResponse, Literal["stop", "length"]]:
        """The small model alone (the `slm` chat model): no escalation, no verification, the
        model's own generation settings. With `emit`, tokens go out as the SLM writes them, so the
        model's citation numbers are kept rather than renumbered. Returns the finish reason too."""
        ctx = self._context(req, trace_id, None, sampling, history, emit, timeout_s, collections)
        with tracing.span("Lead.answer", attributes={"hybrid.mode": "slm", "hybrid.chat": True}):
            if retrieval:
                req = await self._standalone(ctx)
            passages = (
                await ctx.within("retrieve", self._search(ctx, req.query, req.top_k))
                if retrieval
                else []
            )
            if retrieval:
                messages = prompts.answer_messages(req.query, passages, ctx.history)
            else:
                messages = [*ctx.history, {"role": "user", "content": req.query}]
            attempt = await ctx.within(
                "generate",
                self._slm_attempt(
                    ctx, req.query, passages, messages=messages, chat=True, stream=emit is not None
                ),
            )
            response = await self._respond(ctx, passages, attempt)
            tracing.annotate(answer_attributes(response))
            return response, attempt.finish_reason

    async def followup_query(
        self,
        question: str,
        history: Sequence[dict[str, str]],
        collections: Collections = None,
    ) -> str | None:
        """What retrieval would search for `question` asked after `history`; None when it is not
        a follow-up (for measuring the rewrite on its own)."""
        ctx = self._context(
            AnswerRequest(query=question), "followup", None, None, history, None, None, collections
        )
        await self._standalone(ctx)
        return ctx.searched_query

    async def _standalone(self, ctx: RequestContext) -> AnswerRequest:
        """A follow-up question made self-contained (conversation.follow_ups) and used from
        here on, by retrieval and by every prompt; the request itself when it is not one. The
        SLM writes the rewrite, so nothing of the conversation leaves the cluster for it."""
        if ctx.history:
            await self._check_history(ctx)
        how = self.cfg.conversation.follow_ups
        if how == "off" or not is_follow_up(ctx.history):
            return ctx.req
        question = ctx.req.query
        rewritten = None
        with_what = self.cfg.conversation.condense_with
        if how == "condense" and with_what == "claude":
            rewritten = await self._condense_by_claude(ctx)
        elif how == "condense":
            gen_req = GenerationRequest(
                messages=prompts.condense_messages(ctx.history, question),
                max_tokens=self.cfg.conversation.condense_max_tokens,
                temperature=0.0,
                stop=["\n"],
                logprobs=False,
            )
            try:
                reserve = self.slm_fallback_s()  # the answer must still fit after it
                gen = await ctx.within("condense", self.generate(gen_req), reserve_s=reserve)
                ctx.count_slm(gen)
                rewritten = parse_condensed(gen.text, question)
                ctx.condensed_by = "slm"
            except DeadlineExceeded:
                ctx.cut_short("condense")
        searched = rewritten or with_previous(ctx.history, question)
        ctx.condensed_by = "previous" if rewritten is None else ctx.condensed_by
        ctx.searched_query = searched
        ctx.req = ctx.req.model_copy(update={"query": searched})
        tracing.annotate({"hybrid.follow_up": True, "hybrid.condensed_by": ctx.condensed_by})
        return ctx.req

    async def _check_history(self, ctx: RequestContext) -> None:
        """A chat is sensitive when its earlier turns are. The API is stateless, so this is
        decided from what the server can check: a pattern in any turn, a sensitive passage in
        what an earlier question the prompts carry retrieves (as it did when it was asked), or an
        earlier answer they carry that restates one. Asked only while the request could still
        reach a hosted tier; a check the deadline cuts keeps the request local."""
        if ctx.claude is None or ctx.local_only or ctx.on_premises:
            return
        if self.sensitivity.text(*(m.get("content", "") for m in ctx.history)):
            ctx.keep_local()
            return
        top_k = ctx.req.top_k

        async def earlier(turn: dict[str, str]) -> None:
            if turn["role"] == "user":
                await self._search(ctx, turn["content"], top_k)
                return
            hits = await self.retrieve(turn["content"], top_k, ctx.collections)
            if self.sensitivity.written_from(turn["content"], hits):
                ctx.keep_local()

        turns = history_in_use(ctx.history, prompts.HISTORY_TURNS)
        try:
            await ctx.within("follow_up", asyncio.gather(*(earlier(t) for t in turns)))
        except DeadlineExceeded:
            ctx.cut_short("follow_up")
            ctx.keep_local()

    async def _condense_by_claude(self, ctx: RequestContext) -> str | None:
        """Claude's rewrite, when the request may use Claude (not sensitive, the conversation
        included). None when it may not, or the call fails."""
        if ctx.claude is None:
            return None
        call = replace(ctx.call(ctx.req.query, []), history=ctx.history)
        try:
            result = await ctx.within("condense", ctx.claude.call("condense", call))
        except ClaudeUnavailable as exc:
            if exc.reason == KEPT_LOCAL:
                ctx.claude_failed("condense", exc)
            return None
        except DeadlineExceeded:
            return None
        ctx.count_claude(result)
        ctx.condensed_by = "claude"
        return parse_condensed(result.output.question, ctx.req.query)

    async def _route(self, ctx: RequestContext, passages: list[Passage]) -> Attempt:
        """Decomposed, Claude's, or the SLM's answer, escalated when it is not confident."""
        req = ctx.req
        if req.mode == "decompose" or (req.mode == "auto" and query_shape(req.query).complex):
            attempt = await self._decompose(ctx, passages)
            if attempt is not None:
                return attempt
        if req.mode == "claude":
            ctx.escalation = Escalation(escalated=True, reasons=["mode_claude"])
            return await self._claude_or_slm(ctx, req.query, passages)
        attempt = await ctx.within("generate", self._slm_attempt(ctx, req.query, passages))
        if req.mode == "auto" and attempt.confidence.score < self.cfg.escalation.threshold:
            return await self._escalate(ctx, attempt)
        return attempt

    async def _respond(
        self, ctx: RequestContext, passages: Sequence[Passage], attempt: Attempt
    ) -> AnswerResponse:
        """The response, with what the request cost; the ledger hears about it too."""
        usage = ctx.usage
        hourly = self.cfg.cost.slm_gpu_hour_usd
        usage.slm_cost_usd = round(ctx.slm_seconds * hourly / 3600, 8)
        usage.all_claude_cost_usd_estimate = self.all_claude_estimate(
            ctx.req.query, passages, attempt.text
        )
        if self.claude is not None and not ctx.claude_down:
            try:  # bookkeeping may use the margin kept for the response, not more
                await asyncio.wait_for(
                    self.claude.finish_request(
                        ctx.trace_id, usage.slm_cost_usd, usage.all_claude_cost_usd_estimate
                    ),
                    max(ctx.remaining(), 0.0) + RESPONSE_MARGIN_S / 2,
                )
            except Exception:  # the ledger's totals are best effort; the answer is not
                ctx.degrade("ledger_unavailable")
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
                if ctx.timeout_s is None
                else Deadline(
                    timeout_s=ctx.timeout_s,
                    used_s=round(time.time() - ctx.started, 3),
                    cut=ctx.cut,
                )
            ),
            trace_id=ctx.trace_id,
        )

    def all_claude_estimate(self, query: str, passages: Sequence[Passage], answer: str) -> float:
        """Claude alone: its answer prompt with the same evidence, and an answer this long."""
        price = self.cfg.claude.price()
        tokens_in = estimate_tokens(
            prompts.CLAUDE_ANSWER_SYSTEM + prompts.claude_answer_user(query, passages)
        )
        tokens_out = max(estimate_tokens(answer), 20)
        return round((tokens_in * price.input + tokens_out * price.output) / 1e6, 8)

    # -- answering -------------------------------------------------------------------------

    async def _slm_attempt(
        self,
        ctx: RequestContext,
        query: str,
        passages: list[Passage],
        messages: list[dict[str, str]] | None = None,
        route: Route = "slm",
        chat: bool = False,
        stream: bool = False,
    ) -> Attempt:
        """The SLM's answer from `passages`, its citations settled and its confidence scored.
        `chat`: the `slm` chat model: no answer stop sequences, and a text with nothing to cite
        stays as written. `stream`: tokens go out as they come, so their citation numbers can no
        longer change."""
        params = {
            "max_tokens": self.cfg.slm.max_tokens,
            "temperature": self.cfg.slm.temperature,
            "stop": [] if chat else prompts.ANSWER_STOP,
            **ctx.sampling,  # what the client set wins
        }
        gen_req = GenerationRequest(
            messages=messages or prompts.answer_messages(query, passages, ctx.history), **params
        )
        # The answer prompt's layout (passages, labels) may be echoed; a plain chat's cannot.
        layout = not (chat and not passages)
        started = time.monotonic()
        if stream:
            gen = await self._streamed(ctx, gen_req, passages if layout else None)
        else:
            gen = await self.generate(gen_req)
        self.slm_answer_s = 0.8 * self.slm_answer_s + 0.2 * (time.monotonic() - started)
        ctx.count_slm(gen)
        raw, echoed = prompts.strip_echo(gen.text, passages) if layout else (gen.text, False)
        if stream:
            text, citations, sources = raw, as_numbered(raw, passages), []
        elif not layout:
            text, citations, sources = raw, [], []
        else:
            text, citations, sources = finalize_sources(raw, passages)
        confidence = score_answer(query, text, citations, passages, gen.token_logprobs, echoed)
        finish: Literal["stop", "length"] = "length" if gen.finish_reason == "length" else "stop"
        return Attempt(text, citations, passages, confidence, route, sources, finish_reason=finish)

    async def _streamed(
        self,
        ctx: RequestContext,
        gen_req: GenerationRequest,
        passages: Sequence[Passage] | None,
    ) -> GenerationResult:
        """The SLM's tokens out as they come; with `passages`, through the echo filter, so what
        is sent is what the answer will be."""
        if self.generate_stream is None or ctx.emit is None:
            raise RuntimeError("streaming needs generate_stream and an emit callback")
        echo = prompts.EchoFilter(passages) if passages is not None else None
        result: GenerationResult | None = None
        async for item in self.generate_stream(gen_req):
            if isinstance(item, GenerationResult):
                result = item
            elif item:
                out = echo.push(item) if echo is not None else item
                if out:
                    await ctx.emit("answer", {"delta": out})
        if result is None:
            raise SLMStreamEnded("the SLM stream ended without a result")
        rest = echo.flush() if echo is not None else ""
        if rest:
            await ctx.emit("answer", {"delta": rest})
        return result

    async def _claude_attempt(
        self,
        ctx: RequestContext,
        claude: ClaudeRoles,
        query: str,
        passages: list[Passage],
        notes: str = "",
    ) -> Attempt:
        result = await claude.call("answer", ctx.call(query, passages, notes=notes))
        ctx.count_claude(result)
        text, citations, sources = finalize_sources(str(result.output), passages)
        confidence = score_answer(query, text, citations, passages, None)
        return Attempt(text, citations, passages, confidence, "claude", sources)

    def hedge_after_s(self, ctx: RequestContext) -> float:
        """How long a Claude answer runs alone before an SLM answer is started beside it."""
        if ctx.timeout_s is None:
            return math.inf
        keep = max(self.slm_fallback_s(), HEDGE_AT_SHARE * ctx.timeout_s)
        return max(ctx.remaining() - keep, 0.0)

    async def _claude_or_slm(
        self, ctx: RequestContext, query: str, passages: list[Passage]
    ) -> Attempt:
        """Claude's answer, or the SLM's when Claude cannot give one in time. A Claude call still
        running late in the deadline gets the SLM's answer started beside it (a hedged request):
        the fallback is in hand when the deadline comes however many requests fall back at once,
        and Claude keeps the whole deadline to answer."""
        if ctx.claude is None:
            ctx.degrade(ctx.no_claude_reason)
            return await ctx.within("generate", self._slm_attempt(ctx, query, passages))
        claude = asyncio.ensure_future(
            ctx.within("claude", self._claude_attempt(ctx, ctx.claude, query, passages))
        )
        fallback: asyncio.Future[Attempt] | None = None
        try:
            await asyncio.wait({claude}, timeout=self.hedge_after_s(ctx))
            if not claude.done():
                fallback = asyncio.ensure_future(
                    ctx.within("generate", self._slm_attempt(ctx, query, passages))
                )
                await asyncio.wait({claude})  # bounded by the deadline
            try:
                return claude.result()
            except ClaudeUnavailable as exc:
                ctx.claude_failed("claude", exc)
            except DeadlineExceeded:
                ctx.cut_short("claude")
            return await (
                fallback or ctx.within("generate", self._slm_attempt(ctx, query, passages))
            )
        finally:
            tasks = [t for t in (claude, fallback) if t is not None]
            for task in tasks:
                task.cancel()  # a no-op for a finished one
            # Cancelled before the response goes out: no call outlives its request; and the
            # loser's error, if it had one, is retrieved rather than logged as never retrieved.
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- escalation ------------------------------------------------------------------------

    async def _escalate(self, ctx: RequestContext, first: Attempt) -> Attempt:
        """A low-confidence SLM answer: rewritten by Claude and tried again, then Claude's own."""
        ctx.escalation.reasons = first.confidence.reasons or ["low_confidence"]
        if ctx.local_only:
            ctx.escalation.reasons.append("sensitive_kept_local")
            ctx.degrade("sensitive_local_only")
            return first
        if ctx.claude is None:
            ctx.degrade("claude_unavailable")
            return first
        ctx.escalation.escalated = True
        tried = [first]  # what the escalation got to, should the deadline stop it
        with tracing.span("Lead.escalate"):
            try:
                work = self._rewrite_then_claude(ctx, ctx.claude, first, tried)
                attempt = await ctx.within("escalate", work)
            except DeadlineExceeded:
                ctx.cut_short("escalate")
                attempt = max(tried, key=lambda a: a.confidence.score)
            tracing.annotate({"hybrid.route": attempt.route})
        return attempt

    async def _rewrite_then_claude(
        self, ctx: RequestContext, claude: ClaudeRoles, first: Attempt, tried: list[Attempt]
    ) -> Attempt:
        query = ctx.req.query
        try:
            result = await claude.call("rewrite", ctx.call(query, first.passages))
        except ClaudeUnavailable as exc:
            ctx.claude_failed("escalate", exc)
            return first
        ctx.count_claude(result)
        plan: RewritePlan = result.output
        queries = [plan.rewritten_query, *plan.search_queries[:3]]
        passages = await self._retrieve_many(ctx, queries, ctx.req.top_k)
        messages = prompts.answer_messages(plan.rewritten_query, passages, ctx.history)
        second = await self._slm_attempt(
            ctx, query, passages, messages=messages, route="slm+rewrite"
        )
        tried.append(second)
        if second.confidence.score >= self.cfg.escalation.threshold:
            return second
        if ctx.local_only:  # the rewrite's search found sensitive documents
            ctx.escalation.reasons.append("sensitive_kept_local")
            ctx.degrade(KEPT_LOCAL)
            return max(first, second, key=lambda a: a.confidence.score)
        try:
            return await self._claude_attempt(ctx, claude, query, passages)
        except ClaudeUnavailable as exc:
            ctx.claude_failed("claude", exc)
            return max(first, second, key=lambda a: a.confidence.score)

    async def _retrieve_many(
        self, ctx: RequestContext, queries: Sequence[str], top_k: int
    ) -> list[Passage]:
        """Every query's hits fused by reciprocal rank, de-duplicated by chunk."""
        unique = list(dict.fromkeys(q.strip() for q in queries if q.strip()))
        lists = await asyncio.gather(*(self._search(ctx, q, top_k) for q in unique))
        by_id = {p.key: p for hits in lists for p in hits}
        fused = reciprocal_rank_fusion([[p.key for p in hits] for hits in lists])
        return [by_id[cid] for cid, _ in fused[:top_k]]

    # -- decomposition -----------------------------------------------------------------------

    async def _decompose(self, ctx: RequestContext, passages: list[Passage]) -> Attempt | None:
        """Plan, run the sub-agents, merge. None when `auto` finds nothing to split."""
        plan, planner, planner_down = await self._plan(ctx, passages)
        if ctx.req.mode == "auto" and len(plan.subtasks) < 2:
            return None
        if (
            ctx.req.mode == "auto"
            and planner == "local"
            and not self.cfg.escalation.auto_local_plan
        ):
            return None  # answered whole instead (README: routing table)
        ctx.escalation.escalated = planner == "claude"
        ctx.escalation.reasons = [
            "mode_decompose" if ctx.req.mode == "decompose" else "complex_query"
        ]
        if planner == "local":
            ctx.escalation.reasons.append("local_planner")
            if ctx.local_only:
                ctx.escalation.reasons.append("sensitive_kept_local")
            ctx.degrade(planner_down)
        if ctx.emit is not None:
            steps = [st.model_dump() for st in plan.subtasks]
            await ctx.emit("plan", {"planner": planner, "subtasks": steps})

        async def run(st: SubtaskPlan, question: str, queries: list[str]) -> PartialAnswer:
            return await self._subtask(ctx, st, question, queries)

        async def done(part: PartialAnswer) -> None:
            if ctx.emit is not None:
                await ctx.emit("subtask", _subtask(part).model_dump())

        parts = await run_plan(plan, run, self.cfg.escalation.subtask_timeout_s, done)
        if ctx.remaining() <= 0 and any(p.status == "timeout" for p in parts):
            if not any(p.status == "ok" for p in parts):
                raise DeadlineExceeded("subtasks")
            ctx.cut_short("subtasks")
        return _merged(parts, ctx.req.top_k)

    async def _plan(self, ctx: RequestContext, passages: list[Passage]) -> tuple[Plan, str, str]:
        """(plan, planner, why Claude did not plan): Claude's plan, or the local planner's."""
        plan: Plan | None = None
        planner_down = ctx.no_claude_reason
        with tracing.span("Lead.plan"):
            if ctx.claude is not None:
                try:
                    call = ctx.claude.call("plan", ctx.call(ctx.req.query, passages))
                    result = await ctx.within("plan", call, reserve_s=self.slm_fallback_s())
                    ctx.count_claude(result)
                    plan = validate_plan(result.output)
                except ClaudeUnavailable as exc:
                    planner_down = exc.reason
                except DeadlineExceeded:
                    ctx.cut_short("plan")
                    planner_down = "deadline"
            planner = "claude" if plan is not None and plan.subtasks else "local"
            if plan is None or planner == "local":
                plan = local_plan(ctx.req.query)
            tracing.annotate({"hybrid.planner": planner, "hybrid.subtasks": len(plan.subtasks)})
        return plan, planner, planner_down

    async def _subtask(
        self, ctx: RequestContext, st: SubtaskPlan, question: str, queries: list[str]
    ) -> PartialAnswer:
        """One sub-agent: its own retrieval, its own SLM answer."""
        attributes = {"hybrid.subtask.id": st.id, "hybrid.subtask.depends_on": st.depends_on}
        with tracing.span("Lead.subtask", attributes=attributes):
            try:
                found = await ctx.within(
                    "subtasks", self._retrieve_many(ctx, [*queries, question], ctx.req.top_k)
                )
                a = await ctx.within("subtasks", self._slm_attempt(ctx, question, found))
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

    # -- verification --------------------------------------------------------------------------

    async def _verification(self, ctx: RequestContext, attempt: Attempt) -> Attempt:
        """Verify `attempt` when Claude may be used; the better attempt, and the verdict in ctx."""
        if ctx.claude is None:
            ctx.degrade(ctx.no_claude_reason)
            return attempt
        try:
            with tracing.span("Lead.verify"):
                work = self._verify(ctx, ctx.claude, attempt)
                verified, verification = await ctx.within("verify", work)
                tracing.annotate(
                    {
                        "hybrid.verification.score": verification.score,
                        "hybrid.verification.passed": verification.passed,
                        "hybrid.verification.attempts": verification.attempts,
                    }
                )
        except ClaudeUnavailable as exc:
            ctx.claude_failed("verify", exc)
            return attempt
        except DeadlineExceeded:
            ctx.cut_short("verify")
            return attempt
        if verified is not attempt:  # the retry was better: the text changed
            await _emit_text(ctx.emit, verified.text, reset=True)
        if ctx.emit is not None:
            await ctx.emit("verification", verification.model_dump())
        ctx.verification = verification
        return verified

    async def _verify(
        self, ctx: RequestContext, claude: ClaudeRoles, attempt: Attempt
    ) -> tuple[Attempt, Verification]:
        """Grade; below the bar, retry once with the grader's notes and keep the better one."""
        bar = self.cfg.escalation.verify_min_score
        query = ctx.req.query
        grade = await self._grade(ctx, claude, attempt)
        if grade.score >= bar:
            return attempt, Verification(
                score=grade.score, passed=True, attempts=1, notes=grade.notes
            )
        try:
            if attempt.route == "claude":
                retry = await self._claude_attempt(
                    ctx, claude, query, attempt.passages, notes=grade.notes
                )
            else:
                messages = prompts.slm_retry_messages(
                    query, attempt.passages, attempt.text, grade.notes
                )
                retry = await self._slm_attempt(
                    ctx, query, attempt.passages, messages=messages, route=attempt.route
                )
            second = await self._grade(ctx, claude, retry)
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

    async def _grade(self, ctx: RequestContext, claude: ClaudeRoles, attempt: Attempt) -> Grade:
        call = ctx.call(ctx.req.query, attempt.passages, answer=attempt.text)
        result = await claude.call("verify", call)
        ctx.count_claude(result)
        grade: Grade = result.output
        clamp = min(1.0, max(0.0, float(grade.score)))
        return grade.model_copy(update={"score": round(clamp, 4)})

    # -- shadow verification -----------------------------------------------------------------

    def _maybe_shadow(self, ctx: RequestContext, attempt: Attempt) -> None:
        """Grade this answer in the background if it was kept on the SLM by the threshold
        (mode auto, not escalated, not verified, nothing cut) and the request may use Claude
        (never a sensitive one, even with an on-premises tier: its question would go to the
        verdict log), for the configured share of such answers."""
        share = self.cfg.escalation.shadow_verify_share
        kept = ctx.req.mode == "auto" and attempt.route == "slm" and ctx.verification is None
        skip = ctx.claude is None or ctx.sensitive or ctx.cut or not attempt.text.strip()
        if not kept or share <= 0 or skip:
            return
        if self._random.random() >= share:
            return
        task = asyncio.create_task(self._shadow_verify(ctx.claude, ctx, attempt))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow_verify(
        self, claude: ClaudeRoles, ctx: RequestContext, attempt: Attempt
    ) -> None:
        request_id = f"{ctx.trace_id}:shadow"
        call = replace(
            ctx.call(ctx.req.query, attempt.passages, answer=attempt.text), request_id=request_id
        )
        try:
            with tracing.span("Lead.shadow_verify"):
                result = await claude.call("verify", call)
        except ClaudeUnavailable:
            return  # budget, circuit, rate limit: no verdict, and nobody waiting for one
        except Exception:
            log.warning("shadow verification of %s failed", ctx.trace_id, exc_info=True)
            return
        finally:
            with contextlib.suppress(Exception):  # the ledger forgets a day's entries at midnight
                await claude.finish_request(request_id, 0.0, 0.0, requests=0)
        score = round(min(1.0, max(0.0, float(result.output.score))), 4)
        verdict = Verdict(
            at=now(),
            trace_id=ctx.trace_id,
            confidence=attempt.confidence.score,
            threshold=self.cfg.escalation.threshold,
            score=score,
            wrong=score < self.cfg.escalation.verify_min_score,
        )
        if self.on_verdict is not None:
            await self.on_verdict(verdict)

    async def shadow_idle(self) -> None:
        """Wait for the shadow verifications in flight (tests; a draining replica)."""
        while self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)


class SLMStreamEnded(RuntimeError):
    """A streamed generation stopped before its result (its replica went away)."""


def _merged(parts: Sequence[PartialAnswer], top_k: int) -> Attempt:
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
        subtasks=[_subtask(p) for p in parts],
    )


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
        status=part.status,
    )


async def _emit_text(emit: Emit | None, text: str, reset: bool = False) -> None:
    """The settled answer as deltas (word by word); `reset` replaces what was sent before."""
    if emit is None:
        return
    if reset:
        await emit("answer", {"reset": True, "delta": ""})
    for piece in re.findall(r"\S+\s*|\s+", text):
        await emit("answer", {"delta": piece})
