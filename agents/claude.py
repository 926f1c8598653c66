"""Claude's roles (rewrite/plan, answer, verify) behind every limit an enterprise asks for.

One ClaudeGateway lives in the single ClaudeProxy replica; it owns the `anthropic.AsyncAnthropic`
client, the rate limiter, the circuit breaker, the spend ledger and PII redaction. Structured
results come back through tool use with a strict JSON schema and are validated again with pydantic.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from agents import prompts
from agents.limits import (
    BudgetExhausted,
    CircuitBreaker,
    Ledger,
    RateLimited,
    RateLimiter,
)
from agents.pii import Redactor
from agents.schemas import Passage, StrictModel
from cluster.config import ClaudeConfig, PolicyConfig

T = TypeVar("T", bound=BaseModel)
PIIMode = Literal["block", "redact"]

# Characters per token for estimates made before a call (English prose is ~4; be conservative).
CHARS_PER_TOKEN = 3.5


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


class ClaudeUnavailable(Exception):
    """Claude cannot be used for this call; `reason` goes into the response's `degraded`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


# -- structured outputs ---------------------------------------------------------------------


class RewritePlan(StrictModel):
    """The question restated for a retrieval-augmented small model, and what to search for."""

    rewritten_query: str = Field(description="The question, self-contained and unambiguous.")
    search_queries: list[str] = Field(
        description="One to three short search queries that find the needed passages."
    )
    steps: list[str] = Field(description="Short plan steps; empty when the question is simple.")


class Grade(StrictModel):
    """A 0-1 grade of a candidate answer against the passages it cites."""

    factual_support: float = Field(description="0-1: claims supported by the cited passages.")
    citation_match: float = Field(description="0-1: each [n] points at a passage saying that.")
    completeness: float = Field(description="0-1: the answer addresses the whole question.")
    score: float = Field(description="0-1 overall.")
    notes: str = Field(description="Short, concrete notes on what to fix; empty if nothing.")


@dataclass
class CallUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0


@dataclass
class ClaudeResult:
    output: Any
    usage: CallUsage = field(default_factory=CallUsage)
    redacted: bool = False


def tool_spec(name: str, model: type[BaseModel]) -> dict[str, Any]:
    from anthropic.lib._parse._transform import transform_schema

    return {
        "name": name,
        "description": (model.__doc__ or name).strip(),
        "input_schema": transform_schema(model),
        "strict": True,
    }


class ClaudeGateway:
    def __init__(
        self,
        cfg: ClaudeConfig,
        policy: PolicyConfig,
        client: Any | None,
        ledger_path: Path | None = None,
        unavailable_reason: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.client = client
        self.unavailable_reason = unavailable_reason if client is None else None
        self.limiter = RateLimiter(
            cfg.requests_per_minute, cfg.tokens_per_minute, cfg.rate_limit_wait_s
        )
        self.breaker = CircuitBreaker(cfg.circuit_failures, cfg.circuit_cooldown_s)
        self.ledger = Ledger(cfg.daily_budget_usd, cfg.request_budget_usd, ledger_path)
        self.concurrency = asyncio.Semaphore(cfg.max_concurrency)
        self.retries = 0

    # -- costs -----------------------------------------------------------------------------

    def cost(self, usage: CallUsage) -> float:
        p = self.cfg.price()
        return (
            usage.input_tokens * p.input
            + usage.output_tokens * p.output
            + usage.cache_read_tokens * p.cache_read
            + usage.cache_write_tokens * p.cache_write
        ) / 1e6

    def estimate_cost(self, input_tokens: int, output_tokens: int) -> float:
        p = self.cfg.price()
        return (input_tokens * p.input + output_tokens * p.output) / 1e6

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "ready": True,
            "available": self.client is not None and self.breaker.state != "open",
            "reason": self.unavailable_reason
            or ("claude_circuit_open" if self.breaker.state == "open" else None),
            "model": self.cfg.model,
            "circuit": self.breaker.state,
            "budget_remaining_usd": round(self.ledger.remaining_today(), 6),
            "retries": self.retries,
            "totals": self.ledger.totals.__dict__,
        }

    # -- the roles ---------------------------------------------------------------------------

    async def rewrite(
        self, request_id: str, query: str, passages: Sequence[Passage], pii: PIIMode
    ) -> ClaudeResult:
        user = prompts.claude_rewrite_user(query, passages)
        return await self._call(
            request_id,
            prompts.REWRITE_SYSTEM,
            user,
            pii,
            tool=("rewrite_query", RewritePlan),
            max_tokens=512,
        )

    async def plan(
        self, request_id: str, query: str, passages: Sequence[Passage], pii: PIIMode
    ) -> ClaudeResult:
        from agents.planner import Plan

        user = prompts.claude_rewrite_user(query, passages)
        return await self._call(
            request_id,
            prompts.PLAN_SYSTEM,
            user,
            pii,
            tool=("plan_subtasks", Plan),
            max_tokens=800,
        )

    async def verify(
        self, request_id: str, query: str, answer: str, passages: Sequence[Passage], pii: PIIMode
    ) -> ClaudeResult:
        user = prompts.claude_verify_user(query, answer, passages)
        return await self._call(
            request_id,
            prompts.VERIFY_SYSTEM,
            user,
            pii,
            tool=("grade_answer", Grade),
            max_tokens=512,
        )

    async def answer(
        self,
        request_id: str,
        query: str,
        passages: Sequence[Passage],
        pii: PIIMode,
        notes: str = "",
    ) -> ClaudeResult:
        user = prompts.claude_answer_user(query, passages, notes)
        return await self._call(
            request_id,
            prompts.CLAUDE_ANSWER_SYSTEM,
            user,
            pii,
            tool=None,
            max_tokens=min(self.cfg.max_tokens, 1024),
        )

    def finish_request(
        self, request_id: str, slm_cost_usd: float, all_claude_estimate_usd: float
    ) -> None:
        """Close a request's ledger entry and add it to the totals a report shows."""
        self.ledger.forget(request_id)
        t = self.ledger.totals
        t.requests += 1
        t.slm_cost_usd += slm_cost_usd
        t.all_claude_cost_usd_estimate += all_claude_estimate_usd

    # -- one call, every limit -------------------------------------------------------------

    async def _call(
        self,
        request_id: str,
        system: str,
        user: str,
        pii: PIIMode,
        tool: tuple[str, type[T]] | None,
        max_tokens: int,
    ) -> ClaudeResult:
        if self.client is None:
            raise ClaudeUnavailable("claude_unavailable", self.unavailable_reason or "")
        redactor = Redactor(names=self.policy.pii_names)
        outgoing = redactor.redact(user)
        if redactor.found and pii == "block":
            raise ClaudeUnavailable("pii_blocked", "the prompt contains PII and pii=block")
        if not self.breaker.allow():
            raise ClaudeUnavailable("claude_circuit_open")
        verdict: bool | None = None
        reserved = 0.0
        try:
            input_estimate = estimate_tokens(system + outgoing) + (300 if tool else 0)
            reserved = self.estimate_cost(input_estimate, max_tokens)
            try:
                self.ledger.reserve(request_id, reserved)
            except BudgetExhausted as exc:
                reserved = 0.0
                raise ClaudeUnavailable("budget_exhausted", str(exc)) from exc
            try:
                await self.limiter.acquire(input_estimate + max_tokens)
            except RateLimited as exc:
                raise ClaudeUnavailable("claude_rate_limited", str(exc)) from exc
            kwargs: dict[str, Any] = {
                "model": self.cfg.model,
                "max_tokens": max_tokens,
                # Fixed system prompts are cached: later calls pay cache-read prices for them.
                "system": [
                    {"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}
                ],
                "messages": [{"role": "user", "content": outgoing}],
            }
            if tool:
                name, model = tool
                kwargs["tools"] = [tool_spec(name, model)]
                kwargs["tool_choice"] = {"type": "tool", "name": name}
            usage = CallUsage()
            try:
                message = await self._with_retries(kwargs, usage)
            except ClaudeUnavailable:
                verdict = False
                raise
            finally:
                usage.cost_usd = self.cost(usage)
                self.ledger.settle(request_id, reserved, usage.cost_usd)
                reserved = 0.0
                t = self.ledger.totals
                t.calls += usage.attempts
                t.input_tokens += usage.input_tokens
                t.output_tokens += usage.output_tokens
                t.cache_read_tokens += usage.cache_read_tokens
                t.cache_write_tokens += usage.cache_write_tokens
            verdict = True
            output = self._parse(message, tool, redactor)
            return ClaudeResult(output=output, usage=usage, redacted=redactor.found)
        finally:
            if reserved:
                self.ledger.settle(request_id, reserved, 0.0)
            if verdict is True:
                self.breaker.success()
            elif verdict is False:
                self.breaker.failure()
            else:
                self.breaker.release_trial()

    def _parse(self, message: Any, tool: tuple[str, type[T]] | None, redactor: Redactor) -> Any:
        if tool is None:
            text = "".join(b.text for b in message.content if getattr(b, "type", "") == "text")
            return redactor.restore(text)
        name, model = tool
        for block in message.content:
            if getattr(block, "type", "") == "tool_use" and block.name == name:
                try:
                    parsed = model.model_validate(block.input)
                except ValidationError as exc:
                    raise ClaudeUnavailable(
                        "claude_malformed_output", f"{name}: {exc.error_count()} schema errors"
                    ) from exc
                return _restore_model(parsed, redactor)
        raise ClaudeUnavailable("claude_malformed_output", f"no {name} tool call in the reply")

    async def _with_retries(self, kwargs: dict[str, Any], usage: CallUsage) -> Any:
        import anthropic

        attempt = 0
        while True:
            attempt += 1
            usage.attempts += 1
            try:
                async with self.concurrency:
                    message = await self.client.messages.create(
                        **kwargs, timeout=self.cfg.timeout_s
                    )
                u = message.usage
                usage.input_tokens += u.input_tokens or 0
                usage.output_tokens += u.output_tokens or 0
                usage.cache_read_tokens += getattr(u, "cache_read_input_tokens", 0) or 0
                usage.cache_write_tokens += getattr(u, "cache_creation_input_tokens", 0) or 0
                return message
            except (anthropic.RateLimitError, anthropic.InternalServerError) as exc:
                retry_after = _retry_after(exc.response)
                if attempt > self.cfg.max_retries:
                    raise ClaudeUnavailable("claude_error", f"HTTP {exc.status_code}") from exc
                if retry_after is not None and retry_after > self.cfg.max_retry_after_s:
                    raise ClaudeUnavailable(
                        "claude_rate_limited", f"retry-after {retry_after:.0f}s"
                    ) from exc
                delay = retry_after if retry_after is not None else self._backoff(attempt)
            except (anthropic.APITimeoutError, anthropic.APIConnectionError) as exc:
                if attempt > self.cfg.max_retries:
                    raise ClaudeUnavailable("claude_error", type(exc).__name__) from exc
                delay = self._backoff(attempt)
            except anthropic.APIStatusError as exc:  # 400/401/403/404...: retrying cannot help
                raise ClaudeUnavailable("claude_error", f"HTTP {exc.status_code}") from exc
            self.retries += 1
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(0, cap)


def _retry_after(response: Any) -> float | None:
    try:
        value = response.headers.get("retry-after")
    except AttributeError:
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


_PLACEHOLDER = re.compile(r"\[[A-Z]+_\d+\]")


def _restore_model(model: T, redactor: Redactor) -> T:
    if not redactor.found:
        return model

    def fix(v: Any) -> Any:
        if isinstance(v, str):
            return redactor.restore(v) if _PLACEHOLDER.search(v) else v
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return model.model_copy(update={k: fix(v) for k, v in model.__dict__.items()})
