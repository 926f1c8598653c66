"""The request pipeline: one request from question to cited answer, as stages over one
`RequestContext`. Pure asyncio; the ingress gives it Ray handles as plain async callables
(`agents/interfaces.py`), tests give it local ones.

    follow_up → retrieve → route ─┬─ SLM, confident ──────────────────────► "slm"
                                  ├─ escalate: rewrite → retrieve → SLM ──► "slm+rewrite"
                                  │            └─ the LLM tier's answer ──► "claude"
                                  ├─ decompose: plan → sub-agents → merge ► "decomposed"
                                  └─ SLM at capacity, `overload: extract` ► "extractive"
              → verify (policy) → respond

Each stage is a module named after it; every policy decision is in `policy.py`. Policies are code,
not prompt text: nothing a passage says can change them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from hybrid_serve.agents import follow_up, prompts, respond, route, tracing, verify
from hybrid_serve.agents.admission import OVERLOADED
from hybrid_serve.agents.attempts import Attempt, Finish, extractive_attempt, slm_attempt
from hybrid_serve.agents.context import SLM_OVERLOADED, Deadline, RequestContext, RequestOptions
from hybrid_serve.agents.events import EventSink, text_deltas
from hybrid_serve.agents.interfaces import (
    Generate,
    GenerateStream,
    LLMRoles,
    Retrieve,
    Unavailable,
)
from hybrid_serve.agents.retrieve import search
from hybrid_serve.agents.services import OnVerdict, Services
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.schemas import AnswerRequest, AnswerResponse, Collections, Passage, Priority


class Pipeline:
    def __init__(
        self,
        retrieve: Retrieve,
        generate: Generate,
        config: HybridServeConfig,
        llm: LLMRoles | None = None,
        generate_stream: GenerateStream | None = None,
        on_verdict: OnVerdict | None = None,
        on_refuse: Callable[[Priority], None] | None = None,
    ) -> None:
        """`on_refuse` hears each request refused on arrival (`_admitted`)."""
        self.services = Services(retrieve, generate, config, llm, generate_stream, on_verdict)
        self.services.refusals.on_refuse = on_refuse
        self.shadow = verify.ShadowGrader()

    @property
    def cfg(self) -> HybridServeConfig:
        return self.services.cfg

    def reconfigure(self, config: HybridServeConfig) -> None:
        """New tunables (thresholds, policies, prices) for the requests that start from now."""
        s = self.services
        self.services = Services(
            s.retrieve,
            s.generate,
            config,
            s.llm,
            s.generate_stream,
            s.on_verdict,
            s.timing,
            s.refusals,
        )

    def _context(
        self, options: RequestOptions, trace_id: str, events: EventSink | None
    ) -> RequestContext:
        s = self.services
        ctx = RequestContext(
            options=options,
            trace_id=trace_id,
            pii=options.req.pii or s.cfg.policies.pii,
            llm=s.llm,
            deadline=Deadline(options.timeout_s),
            events=events,
            on_premises=s.cfg.llm.on_premises,
        )
        if s.policy.sensitivity.request(options.req):
            ctx.keep_local()
        return ctx

    @contextlib.contextmanager
    def _admitted(self, ctx: RequestContext, extract: bool = False) -> Iterator[bool]:
        """Refused on arrival when the SLM has just refused a request like it (no retrieval,
        no hops); a refusal of this one is remembered for those that follow. With `extract`
        (the request takes the cheaper route) it is not refused: True says the SLM is to be
        skipped."""
        refusals = self.services.refusals
        refused = refusals.check(ctx.options.priority, ctx.remaining(), count=not extract)
        if refused is not None and not extract:
            raise refused
        try:
            yield refused is not None
        except Unavailable as exc:
            refusals.heard(ctx.options.priority, exc)
            raise

    async def _routed(
        self, ctx: RequestContext, passages: list[Passage], skip_slm: bool
    ) -> Attempt:
        """The route's answer; where the request allows it (`overload: extract`), the
        extractive answer instead when the SLM is at capacity — known on arrival, or refused
        now."""
        if not skip_slm:
            try:
                return await route.run(self.services, ctx, passages)
            except Unavailable as exc:
                self._extracts(ctx, exc)
        ctx.degrade(SLM_OVERLOADED)
        return extractive_attempt(ctx.req.query, passages)

    def _extracts(self, ctx: RequestContext, exc: Unavailable) -> None:
        """Returns when the SLM's refusal is to be answered by the extractive route (the
        request allows it), remembered for the requests that follow; re-raises it otherwise."""
        if exc.reason != OVERLOADED or ctx.req.overload != "extract":
            raise exc
        self.services.refusals.heard(ctx.options.priority, exc)

    async def answer(
        self, options: RequestOptions, trace_id: str, events: EventSink | None = None
    ) -> AnswerResponse:
        """The whole pipeline. Later steps are cut short to answer by the deadline;
        DeadlineExceeded when not even a first answer is ready."""
        s = self.services
        ctx = self._context(options, trace_id, events)
        attributes = {"hybrid.mode": options.req.mode, "hybrid.top_k": options.req.top_k}
        extract = options.req.overload == "extract"
        with (
            tracing.span("Pipeline.answer", attributes=attributes),
            self._admitted(ctx, extract) as skip_slm,
        ):
            if not skip_slm:  # a follow-up's rewrite may need the SLM
                try:
                    await follow_up.run(s, ctx)
                except Unavailable as exc:
                    self._extracts(ctx, exc)
                    skip_slm = True
            passages = await ctx.within("retrieve", search(s, ctx, ctx.req.query, ctx.req.top_k))
            tracing.annotate({"hybrid.sensitive": ctx.sensitive})
            attempt = await self._routed(ctx, passages, skip_slm)
            if events is not None:
                for delta in text_deltas(attempt.text):
                    await events(delta)
            written = attempt.route != "extractive"  # the cheap route: no Claude, no grading
            if written and s.policy.wants_verification(ctx.req, attempt.route):
                attempt = await verify.run(s, ctx, attempt)
            response = await respond.run(s, ctx, passages, attempt)
            tracing.annotate(respond.attributes(response))
            if written:
                self.shadow.maybe(s, ctx, attempt)
            return response

    async def answer_slm(
        self,
        options: RequestOptions,
        trace_id: str,
        events: EventSink | None = None,
        retrieval: bool = True,
    ) -> tuple[AnswerResponse, Finish]:
        """The small model alone (the `slm` chat model): no escalation, no verification, the
        model's own generation settings. With `events`, tokens go out as the SLM writes them, so
        the model's citation numbers are kept rather than renumbered."""
        s = self.services
        ctx = self._context(options, trace_id, events)
        with (
            tracing.span("Pipeline.answer", attributes={"hybrid.mode": "slm", "hybrid.chat": True}),
            self._admitted(ctx),
        ):
            passages = []
            if retrieval:
                await follow_up.run(s, ctx)
                work = search(s, ctx, ctx.req.query, ctx.req.top_k)
                passages = await ctx.within("retrieve", work)
                prompt = prompts.answer_prompt(ctx.req.query, passages, ctx.history)
            else:
                history = [*ctx.history, {"role": "user", "content": ctx.req.query}]
                prompt = prompts.Prompt(history)
            attempt = await ctx.within(
                "generate",
                slm_attempt(
                    s,
                    ctx,
                    ctx.req.query,
                    passages,
                    prompt=prompt,
                    chat=True,
                    stream=events is not None,
                ),
            )
            response = await respond.run(s, ctx, passages, attempt)
            tracing.annotate(respond.attributes(response))
            return response, attempt.finish_reason

    async def followup_query(
        self,
        question: str,
        history: list[dict[str, str]],
        collections: Collections = None,
    ) -> str | None:
        """What retrieval would search for `question` asked after `history`; None when it is
        not a follow-up (for measuring the rewrite on its own)."""
        options = RequestOptions(
            AnswerRequest(query=question), history=history, collections=collections
        )
        ctx = self._context(options, "followup", None)
        await follow_up.run(self.services, ctx)
        return ctx.searched_query

    async def shadow_idle(self) -> None:
        """Wait for the shadow verifications in flight (tests; a draining replica)."""
        await self.shadow.idle()
