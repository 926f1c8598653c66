"""One request as it moves through the pipeline: what was asked (`RequestOptions`), its deadline
(`Deadline`, the only clock the stages read), where its progress events go, and what it has used
and decided so far (`RequestContext`)."""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hybrid_serve.agents.events import EventSink
from hybrid_serve.agents.interfaces import (
    DeadlineExceeded,
    LLMCall,
    LLMResult,
    LLMRoles,
    Unavailable,
)
from hybrid_serve.agents.policy import KEPT_LOCAL
from hybrid_serve.schemas import (
    AnswerRequest,
    Collections,
    Escalation,
    GenerationRequest,
    GenerationResult,
    Passage,
    PIIHandling,
    Priority,
    Usage,
    Verification,
)

T = TypeVar("T")

# Degraded reason of an answer one of whose prompts (the SLM's or the LLM tier's) was fitted to
# the model's context: lower-ranked passages (or the oldest chat turns) were left out.
PROMPT_TRIMMED = "prompt_trimmed"
# The SLM was at capacity and the request allowed the cheaper route: the answer was extracted
# from the passages, not written (`overload: extract`).
SLM_OVERLOADED = "slm_overloaded"
# Kept back from the deadline for writing the response and the ledger's bookkeeping.
RESPONSE_MARGIN_S = 0.25


@dataclass(frozen=True)
class RequestOptions:
    """Everything a client's request decides, whichever API it came through. `llm_down`: why the
    LLM tier is known to be unusable for it before it starts (no key, the key's budget spent);
    `sampling`: GenerationRequest fields the client set; `history`: the chat before the
    question; `collections`: what the caller's key may read (None: every collection);
    `timeout_s`: its deadline; `priority`: batch work yields to interactive work."""

    req: AnswerRequest
    llm_down: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    history: Sequence[dict[str, str]] = ()
    collections: Collections = None
    timeout_s: float | None = None
    priority: Priority = "interactive"


@dataclass
class Deadline:
    """A request's deadline as wall-clock time (it crosses processes with the LLM tier's calls):
    the steps ask it what remains and run their work within it."""

    timeout_s: float | None = None
    started: float = field(default_factory=time.time)
    cut: list[str] = field(default_factory=list)  # steps cut short or skipped to answer in time

    @property
    def at(self) -> float | None:
        return None if self.timeout_s is None else self.started + self.timeout_s

    def remaining(self) -> float:
        """Seconds left for work, keeping back what sending the response takes."""
        if self.at is None:
            return math.inf
        return self.at - time.time() - RESPONSE_MARGIN_S

    def used_s(self) -> float:
        return round(time.time() - self.started, 3)

    async def within(self, step: str, work: Awaitable[T], reserve_s: float = 0.0) -> T:
        """`work` bounded by what remains, less `reserve_s` kept for what must follow it:
        cancelled, and DeadlineExceeded raised, when that runs out (the cancellation reaches
        other deployments' calls too)."""
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


@dataclass
class RequestContext:
    """One request in flight. `llm` is None once the LLM tier may not be used for it (it is
    down, or the request turned out sensitive)."""

    options: RequestOptions
    trace_id: str
    pii: PIIHandling
    llm: LLMRoles | None
    deadline: Deadline
    events: EventSink | None = None
    on_premises: bool = False  # the LLM tier runs inside the cluster (llm.on_premises)
    # The question in use: a follow-up's self-contained rewrite replaces the asked one.
    req: AnswerRequest = field(init=False)
    history: list[dict[str, str]] = field(init=False)
    sensitive: bool = False
    degraded: list[str] = field(default_factory=list)
    escalation: Escalation = field(default_factory=Escalation)
    verification: Verification | None = None
    usage: Usage = field(default_factory=Usage)
    slm_seconds: float = 0.0
    searched_query: str | None = None
    condensed_by: str | None = None

    def __post_init__(self) -> None:
        self.req = self.options.req
        self.history = list(self.options.history)
        if self.options.llm_down:
            self.llm = None
            self.degrade(self.options.llm_down)

    @property
    def collections(self) -> Collections:
        return self.options.collections

    @property
    def cut(self) -> list[str]:
        return self.deadline.cut

    def remaining(self) -> float:
        return self.deadline.remaining()

    def slm_request(self, **fields: Any) -> GenerationRequest:
        """A generation for this request: it carries what remains of the deadline and the
        priority, so the SLM replica can refuse what it cannot finish in time."""
        left = self.remaining()
        return GenerationRequest(
            **fields,
            deadline=None if left == math.inf else time.time() + max(left, 0.0),
            priority=self.options.priority,
        )

    async def within(self, step: str, work: Awaitable[T], reserve_s: float = 0.0) -> T:
        return await self.deadline.within(step, work, reserve_s)

    def cut_short(self, step: str) -> None:
        """A step skipped or stopped to answer in time."""
        if step not in self.deadline.cut:
            self.deadline.cut.append(step)
        self.degrade("deadline")

    def degrade(self, reason: str) -> None:
        if reason not in self.degraded:
            self.degraded.append(reason)

    def llm_failed(self, step: str, exc: Unavailable) -> None:
        """An LLM step that gave nothing: cut short when the deadline stopped it (whether our
        timer or the proxy noticed first), kept local when the privacy gate refused it,
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
            self.llm = None

    @property
    def local_only(self) -> bool:
        """Sensitive, and the LLM tier is outside the cluster."""
        return self.sensitive and not self.on_premises

    @property
    def no_llm_reason(self) -> str:
        return KEPT_LOCAL if self.local_only else "claude_unavailable"

    def call(
        self, query: str, passages: Sequence[Passage], answer: str = "", notes: str = ""
    ) -> LLMCall:
        """The input of an LLM-tier call made for this request (its mark travels with it)."""
        return LLMCall(
            self.trace_id,
            query,
            passages,
            self.pii,
            answer=answer,
            notes=notes,
            deadline=self.deadline.at,
            sensitive=self.sensitive,
            priority=self.options.priority,
        )

    def count_slm(self, gen: GenerationResult) -> None:
        self.usage.slm_prompt_tokens += gen.prompt_tokens
        self.usage.slm_completion_tokens += gen.completion_tokens
        self.slm_seconds += gen.charged_seconds()

    def count_llm(self, result: LLMResult) -> None:
        u, cu = self.usage, result.usage
        u.claude_input_tokens += cu.input_tokens
        u.claude_output_tokens += cu.output_tokens
        u.claude_cache_read_tokens += cu.cache_read_tokens
        u.claude_cache_write_tokens += cu.cache_write_tokens
        u.claude_calls += cu.attempts
        u.cost_usd = round(u.cost_usd + cu.cost_usd, 8)
        u.llm_tier = "on_premises" if self.on_premises else "hosted"
        u.llm_model = result.model
        if result.passages_used is not None or result.history_dropped:
            self.degrade(PROMPT_TRIMMED)
