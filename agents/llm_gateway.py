"""The gateway to the LLM tier, behind every limit an enterprise asks for: the only place a call
leaves the cluster.

One `LLMGateway` lives in the single LLMProxy replica; it owns the `anthropic.AsyncAnthropic`
client, the privacy gate, the rate limiter, the circuit breaker, the spend ledger and PII
redaction. Retries are the SDK's own (`max_retries`: 408/409/429/5xx, timeouts, resets,
`x-should-retry`, `retry-after(-ms)`); a middleware adds what the SDK lacks: failing fast on a
`retry-after` longer than `llm.max_retry_after_s`, counting attempts, and the concurrency cap per
attempt. Structured results come back through tool use with a strict JSON schema and are
validated again with pydantic (`roles.py`).
"""

from __future__ import annotations

import contextvars
import email.utils
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import anthropic
from pydantic import BaseModel, ValidationError

from hybrid_serve.agents import pricing
from hybrid_serve.agents.admission import DeadlineQueue
from hybrid_serve.agents.interfaces import CallUsage, LLMCall, LLMResult, Role, Unavailable
from hybrid_serve.agents.limits import (
    BudgetExhausted,
    CircuitBreaker,
    Ledger,
    RateLimited,
    RateLimiter,
)
from hybrid_serve.agents.pii import Redactor
from hybrid_serve.agents.policy import KEPT_LOCAL, PrivacyGate
from hybrid_serve.agents.roles import ROLES, RoleSpec, recover_tool_input, tool_spec
from hybrid_serve.config import LLMConfig, PolicyConfig
from hybrid_serve.engines.replica_time import ReplicaClock
from hybrid_serve.schemas import Priority

T = TypeVar("T", bound=BaseModel)
log = logging.getLogger(__name__)

# -- what the SDK's retries lack ----------------------------------------------------------------


@dataclass
class _InFlight:
    """The call in progress in this task, as the middleware sees it on every attempt."""

    usage: CallUsage
    deadline: float | None
    priority: Priority = "interactive"
    max_tokens: int = 0


@dataclass(frozen=True)
class _Attempt:
    """One attempt as the concurrency cap admits it (`admission.SlotRequest`)."""

    max_tokens: int
    deadline_s: float | None
    priority: Priority


_in_flight: contextvars.ContextVar[_InFlight | None] = contextvars.ContextVar(
    "claude_in_flight", default=None
)
# Degraded reason of a call the concurrency cap refused: it could not start and finish inside
# its request's deadline behind the calls ahead of it.
LLM_OVERLOADED = "claude_overloaded"
# An attempt with less time than this left before the request's deadline is not started.
MIN_ATTEMPT_S = 0.5


class DeadlineReached(Exception):
    """The request's deadline leaves no time for another attempt."""


class RetryAfterTooLong(Exception):
    """The API asked for a longer wait than we are willing to hold a request for."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"retry-after {seconds:.0f}s")
        self.seconds = seconds


def retry_after_s(headers: Any) -> float | None:
    """Seconds a response asks to wait (`retry-after-ms`, `retry-after` as seconds or a date)."""
    if headers is None:
        return None
    try:
        return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except (KeyError, TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else max(0.0, email.utils.mktime_tz(parsed) - time.time())


class AttemptGuard(anthropic.Middleware):
    """Anthropic SDK middleware, run once per attempt inside the SDK's retry loop: holds a slot
    of the concurrency cap for the attempt (interactive calls before batch ones; one that could
    not finish before its request's deadline is refused at once: `admission.DeadlineQueue`),
    counts it and charges it its share of the tier's time (attempts running together share it:
    a self-hosted tier batches them), starts none past the request's deadline, and stops the
    retries when the API asks for a wait longer than `max_retry_after_s` (the SDK would sleep up
    to any length)."""

    def __init__(self, max_concurrency: int, max_retry_after_s: float) -> None:
        self.slots = DeadlineQueue(max_concurrency)
        self.max_retry_after_s = max_retry_after_s
        self.tier_time = ReplicaClock()

    async def handle_async(self, request: Any, call_next: Any) -> Any:
        call = _in_flight.get()
        attempt = _Attempt(0, None, "interactive")  # counting tokens, asking the model list
        if call is not None:
            if call.deadline is not None and call.deadline - time.time() < MIN_ATTEMPT_S:
                raise DeadlineReached()
            call.usage.attempts += 1
            left = None if call.deadline is None else call.deadline - time.time()
            attempt = _Attempt(call.max_tokens, left, call.priority)
        async with self.slots.slot(attempt):
            if call is None:
                response = await call_next(request)
            else:
                with self.tier_time.charging() as share:
                    response = await call_next(request)
                call.usage.shared_seconds = (call.usage.shared_seconds or 0.0) + share.seconds
        if response.status_code == 429 or response.status_code >= 500:
            wait = retry_after_s(response.headers)
            if wait is not None and wait > self.max_retry_after_s:
                raise RetryAfterTooLong(wait)
        return response


def tier_client(
    base_url: str | None, key: str | None
) -> tuple[anthropic.AsyncAnthropic | None, str | None]:
    """The SDK client for the tier, or None and why. The SDK sends the key as a bearer token,
    which Anthropic's API and vLLM's --api-key both check. Anthropic's API (base_url None: the
    SDK's default or ANTHROPIC_BASE_URL) needs a key; another server may have none."""
    # The gateway sets the retries and timeout from the configuration.
    if base_url is None:
        return (anthropic.AsyncAnthropic(api_key=key), None) if key else (None, "no_api_key")
    # The SDK insists on some credential; a server without a key ignores this one.
    return anthropic.AsyncAnthropic(base_url=base_url, api_key=key or "none"), None


class LLMGateway:
    """`client`: an AsyncAnthropic (key and base URL as the caller built it), or None when no key
    is set. The gateway uses a copy with its own retries, timeout and middleware."""

    def __init__(
        self,
        cfg: LLMConfig,
        policy: PolicyConfig,
        client: anthropic.AsyncAnthropic | None,
        ledger_path: Path | None = None,
        unavailable_reason: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.gate = PrivacyGate(policy, cfg.on_premises)
        self.guard = AttemptGuard(cfg.max_concurrency, cfg.max_retry_after_s)
        self.client = (
            client.with_middleware(self.guard).with_options(
                max_retries=cfg.max_retries, timeout=cfg.timeout_s
            )
            if client is not None
            else None
        )
        self.unavailable_reason = unavailable_reason if client is None else None
        self.limiter = RateLimiter(
            cfg.requests_per_minute, cfg.tokens_per_minute, cfg.rate_limit_wait_s
        )
        self.breaker = CircuitBreaker(cfg.circuit_failures, cfg.circuit_cooldown_s)
        self.ledger = Ledger(cfg.daily_budget_usd, cfg.request_budget_usd, ledger_path)
        self.retries = 0  # attempts beyond each call's first, since start
        self.recovered_tool_calls = 0  # tool calls taken from the reply's text
        self.fitted_calls = 0  # calls whose prompt was cut to the tier's context
        self._asked_context = False
        self._served_context: int | None = None
        self._can_count = True

    def reconfigure(self, cfg: LLMConfig, policy: PolicyConfig) -> None:
        """New limits, budgets, prices and policies, in place: the ledger's totals, the
        circuit's state and the requests the gate has kept stay as they are."""
        kept = self.gate
        self.cfg, self.policy = cfg, policy
        self.gate = PrivacyGate(policy, cfg.on_premises, kept.max_requests, kept.ttl_s)
        self.gate.refused, self.gate._kept = kept.refused, kept._kept
        self.guard.slots.resize(cfg.max_concurrency)
        self.guard.max_retry_after_s = cfg.max_retry_after_s
        if self.client is not None:
            self.client = self.client.with_options(
                max_retries=cfg.max_retries, timeout=cfg.timeout_s
            )
        self.limiter.reconfigure(
            cfg.requests_per_minute, cfg.tokens_per_minute, cfg.rate_limit_wait_s
        )
        self.breaker.threshold = cfg.circuit_failures
        self.breaker.cooldown_s = cfg.circuit_cooldown_s
        self.ledger.daily_budget_usd = cfg.daily_budget_usd
        self.ledger.request_budget_usd = cfg.request_budget_usd

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "ready": True,
            "available": self.client is not None and self.breaker.state != "open",
            "reason": self.unavailable_reason
            or ("claude_circuit_open" if self.breaker.state == "open" else None),
            "model": self.cfg.model,
            "tier": self.cfg.tier,
            "circuit": self.breaker.state,
            "budget_remaining_usd": round(self.ledger.remaining_today(), 6),
            "reserved_usd": round(self.ledger.reserved, 8),
            "retries": self.retries,
            "recovered_tool_calls": self.recovered_tool_calls,
            "fitted_calls": self.fitted_calls,
            "queue": self.guard.slots.info(),
            "tier_time": self.guard.tier_time.info(),
            "context_tokens": self.cfg.known_context_tokens() or self._served_context,
            "kept_local": self.gate.refused,
            "totals": self.ledger.totals.__dict__,
        }

    # -- the roles ---------------------------------------------------------------------------

    async def call(self, role: Role, request: LLMCall) -> LLMResult:
        """One role's call. Every call to the tier comes through here, past the privacy gate."""
        why = self.gate.check(request)
        if why is not None:
            raise Unavailable(KEPT_LOCAL, f"kept inside the cluster: {why}")
        spec = ROLES[role]
        max_tokens = spec.max_tokens or min(self.cfg.max_tokens, 1024)
        return await self._call(request, spec, max_tokens)

    async def finish_request(
        self,
        request_id: str,
        slm_cost_usd: float,
        all_llm_estimate_usd: float,
        requests: int = 1,
    ) -> None:
        """Close a request's ledger entry and add it to the totals a report shows (`requests`
        0: background work such as a shadow verification, not a request)."""
        self.ledger.forget(request_id)
        t = self.ledger.totals
        t.requests += requests
        t.slm_cost_usd += slm_cost_usd
        t.all_claude_cost_usd_estimate += all_llm_estimate_usd

    # -- one call, every limit -------------------------------------------------------------

    async def _call(self, request: LLMCall, spec: RoleSpec, max_tokens: int) -> LLMResult:
        if self.client is None:
            raise Unavailable("claude_unavailable", self.unavailable_reason or "")
        deadline = request.deadline
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < MIN_ATTEMPT_S:
            raise Unavailable("deadline", "no time left in the request for a call")
        redactor = Redactor(names=self.policy.pii_names)
        if request.pii == "block":
            redactor.redact(spec.user(request))
            if redactor.found:
                raise Unavailable("pii_blocked", "the prompt contains PII and pii=block")
        if not self.breaker.allow():
            raise Unavailable("claude_circuit_open")
        verdict: bool | None = None
        reserved = 0.0
        try:
            kwargs, sent = await self._fitted(request, spec, redactor, max_tokens)
            input_estimate = pricing.estimate_tokens(
                kwargs["system"][0]["text"] + kwargs["messages"][-1]["content"]
            ) + (300 if spec.tool else 0)
            reserved = pricing.reserve_estimate(self.cfg, input_estimate, max_tokens)
            try:
                self.ledger.reserve(request.request_id, reserved)
            except BudgetExhausted as exc:
                reserved = 0.0
                raise Unavailable("budget_exhausted", str(exc)) from exc
            try:
                await self.limiter.acquire(input_estimate + max_tokens, left)
            except RateLimited as exc:
                raise Unavailable("claude_rate_limited", str(exc)) from exc
            usage = CallUsage()
            started = time.perf_counter()
            try:
                message = await self._send(kwargs, usage, deadline, request.priority)
            except Unavailable as exc:
                # The cap's own refusal says nothing of the tier's health.
                verdict = None if exc.reason == LLM_OVERLOADED else False
                raise
            finally:
                usage.seconds = time.perf_counter() - started
                self._settle(request.request_id, reserved, usage)
                reserved = 0.0
            verdict = True
            output = self._parse(message, spec.tool, redactor)
            served = getattr(message, "model", None) or self.cfg.model
            result = LLMResult(output=output, usage=usage, redacted=redactor.found, model=served)
            if sent is not request:
                result.passages_used = len(sent.passages)
                result.history_dropped = len(request.history) - len(sent.history)
            return result
        finally:
            if reserved:
                self.ledger.settle(request.request_id, reserved, 0.0)
            if verdict is True:
                self.breaker.success()
            elif verdict is False:
                self.breaker.failure()
            else:
                self.breaker.release_trial()

    # -- the prompt fitted to the tier's context -------------------------------------------

    async def _fitted(
        self, request: LLMCall, spec: RoleSpec, redactor: Redactor, max_tokens: int
    ) -> tuple[dict[str, Any], LLMCall]:
        """The Messages API request for `request`, and the call it was built from: the whole
        call when it fits the tier's context with room for `max_tokens`; else the earlier chat
        turns left out oldest first, then the lowest-ranked passages, as few as needed (a
        binary search: O(log n) counts). A prompt sure to fit by its bytes is never counted;
        one that might not is counted by the tier (`count_tokens`, Anthropic's and vLLM's), or,
        where the tier cannot count, held to the byte bound."""

        def build(call: LLMCall) -> dict[str, Any]:
            user = spec.user(call)
            # `keep` (an on-premises tier only, checked by the configuration) sends it as is.
            outgoing = user if call.pii == "keep" else redactor.redact(user)
            return self._request(spec.system, outgoing, spec.tool, max_tokens)

        whole = build(request)
        context = await self._context_tokens()
        if context is None:
            return whole, request
        room = context - max_tokens

        async def fits(kwargs: dict[str, Any]) -> bool:
            if byte_bound(kwargs) <= room:
                return True
            counted = await self._count_tokens(kwargs, request.deadline)
            return counted is not None and counted <= room

        if await fits(whole):
            return whole, request
        smaller = _smaller_calls(request)
        low, high = -1, len(smaller)  # smaller[low] does not fit (or the whole), smaller[high] does
        built: dict[int, dict[str, Any]] = {}
        while high - low > 1:
            mid = (low + high) // 2
            built[mid] = build(smaller[mid])
            if await fits(built[mid]):
                high = mid
            else:
                low = mid
        if high == len(smaller):
            raise Unavailable(
                "llm_prompt_too_long",
                f"not even the question and one passage fit the tier's context of {context} "
                f"tokens with room for {max_tokens}",
            )
        self.fitted_calls += 1
        return built[high], smaller[high]

    async def _context_tokens(self) -> int | None:
        """The tier's context window: configured or known (`LLMConfig.known_context_tokens`),
        else as the server's model list says (vLLM's `max_model_len`), asked once."""
        known = self.cfg.known_context_tokens()
        if known is not None or self._asked_context:
            return known or self._served_context
        self._asked_context = True
        assert self.client is not None
        try:
            listing = await self.client.with_options(max_retries=1, timeout=5.0).get(
                "/v1/models", cast_to=object
            )
            models = listing.get("data", []) if isinstance(listing, dict) else []
            for model in models:
                if isinstance(model, dict) and model.get("id") == self.cfg.model:
                    size = model.get("max_model_len") or model.get("max_input_tokens")
                    self._served_context = int(size) if size else None
        except (anthropic.APIError, ValueError, TypeError):
            self._served_context = None
        if self._served_context is None:
            log.warning(
                "the LLM tier does not say its context window: prompts are not fitted to it "
                "(set llm.context_tokens)"
            )
        return self._served_context

    async def _count_tokens(self, kwargs: dict[str, Any], deadline: float | None) -> int | None:
        """The request's input tokens as the tier counts them; None where it cannot count (a
        server without `count_tokens`). A tier that refuses to count a prompt longer than its
        whole context (vLLM) has answered too: it does not fit."""
        if not self._can_count:
            return None
        assert self.client is not None
        timeout = self.cfg.timeout_s
        if deadline is not None:
            timeout = min(timeout, max(deadline - time.time(), MIN_ATTEMPT_S))
        body = {k: kwargs[k] for k in _COUNTED if k in kwargs}
        try:
            counted = await self.client.with_options(
                max_retries=1, timeout=timeout
            ).messages.count_tokens(**body)
        except anthropic.BadRequestError as exc:
            if "context length" in str(exc):
                return sys.maxsize
            self._can_count = False
        except anthropic.APIStatusError as exc:
            # A server without the route; errors of the moment leave counting on.
            self._can_count = exc.status_code not in (404, 405, 501)
            return None
        except anthropic.APIError:
            return None
        else:
            return counted.input_tokens
        log.warning("the LLM tier cannot count tokens: prompts are fitted by their bytes")
        return None

    def _request(
        self, system: str, user: str, tool: tuple[str, type[T]] | None, max_tokens: int
    ) -> dict[str, Any]:
        """The Messages API request: a cached system prompt, the user message, the forced tool."""
        kwargs: dict[str, Any] = {
            "model": self.cfg.model,
            "max_tokens": max_tokens,
            # Fixed system prompts are cached: later calls pay cache-read prices for them.
            "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": user}],
        }
        if tool:
            name, model = tool
            # An on-premises tier serves an open model: its server enforces the full schema.
            kwargs["tools"] = [tool_spec(name, model, full_schema=self.cfg.on_premises)]
            kwargs["tool_choice"] = {"type": "tool", "name": name}
        return kwargs

    def _settle(self, request_id: str, reserved: float, usage: CallUsage) -> None:
        """A call's real cost in place of its reservation, and in the totals."""
        usage.cost_usd = pricing.call_cost(self.cfg, usage)
        self.ledger.settle(request_id, reserved, usage.cost_usd)
        t = self.ledger.totals
        t.calls += usage.attempts
        self.retries += max(0, usage.attempts - 1)
        t.input_tokens += usage.input_tokens
        t.output_tokens += usage.output_tokens
        t.cache_read_tokens += usage.cache_read_tokens
        t.cache_write_tokens += usage.cache_write_tokens

    async def _send(
        self,
        kwargs: dict[str, Any],
        usage: CallUsage,
        deadline: float | None,
        priority: Priority = "interactive",
    ) -> Any:
        """One Messages API call with the SDK's retries, each attempt's timeout cut to what
        remains of the request's deadline; its failures as degraded reasons."""
        assert self.client is not None
        client = self.client
        if deadline is not None:
            left = max(deadline - time.time(), MIN_ATTEMPT_S)
            client = client.with_options(timeout=min(self.cfg.timeout_s, left))
        token = _in_flight.set(_InFlight(usage, deadline, priority, kwargs["max_tokens"]))
        try:
            message = await client.messages.create(**kwargs)
        except Unavailable as exc:  # the concurrency cap's refusal (admission by deadline)
            raise Unavailable(LLM_OVERLOADED, exc.detail, exc.retry_after_s) from exc
        except DeadlineReached as exc:
            raise Unavailable("deadline", "the request's deadline ended the retries") from exc
        except RetryAfterTooLong as exc:
            raise Unavailable("claude_rate_limited", str(exc)) from exc
        except anthropic.APIStatusError as exc:
            raise Unavailable("claude_error", f"HTTP {exc.status_code}") from exc
        except anthropic.APIError as exc:  # timeouts and connection failures, after retries
            raise Unavailable("claude_error", type(exc).__name__) from exc
        finally:
            _in_flight.reset(token)
        u = message.usage
        usage.input_tokens += u.input_tokens or 0
        usage.output_tokens += u.output_tokens or 0
        usage.cache_read_tokens += getattr(u, "cache_read_input_tokens", 0) or 0
        usage.cache_write_tokens += getattr(u, "cache_creation_input_tokens", 0) or 0
        return message

    def _parse(self, message: Any, tool: tuple[str, type[T]] | None, redactor: Redactor) -> Any:
        text = "".join(b.text for b in message.content if getattr(b, "type", "") == "text")
        if tool is None:
            return redactor.restore(text)
        name, model = tool
        found: Any = None
        recovered = False
        for block in message.content:
            if getattr(block, "type", "") == "tool_use" and block.name == name:
                found = block.input
                break
        else:
            # A model served without enforced tool calls may write the call as text instead.
            found = recover_tool_input(text, name)
            if found is None:
                raise Unavailable("claude_malformed_output", f"no {name} tool call in the reply")
            recovered = True
        try:
            parsed = model.model_validate(found)
        except ValidationError as exc:
            raise Unavailable(
                "claude_malformed_output", f"{name}: {exc.error_count()} schema errors"
            ) from exc
        self.recovered_tool_calls += recovered
        return _restore_model(parsed, redactor)


# Tokens a tier's rendering adds beyond the request's text: role markers, the chat template, and
# the tool-use instructions a Messages API puts in front of tools (a few hundred on Anthropic's).
TEMPLATE_TOKENS = 512
# What `count_tokens` takes of a Messages API request.
_COUNTED = ("model", "system", "messages", "tools", "tool_choice")


def byte_bound(kwargs: dict[str, Any]) -> int:
    """Input tokens a request cannot exceed, known without a tokenizer: a byte-level BPE (or
    byte-fallback) tokenizer never makes more tokens than the text has UTF-8 bytes."""
    text = json.dumps([kwargs.get(k) for k in _COUNTED[1:]], ensure_ascii=False)
    return len(text.encode()) + TEMPLATE_TOKENS


def _smaller_calls(request: LLMCall) -> list[LLMCall]:
    """`request` with less and less in it, in the order things are given up: earlier chat
    turns oldest first, then passages from the lowest-ranked (one passage at least stays)."""
    history, passages = list(request.history), list(request.passages)
    calls = [replace(request, history=history[i:]) for i in range(1, len(history) + 1)]
    calls += [
        replace(request, history=(), passages=passages[:n]) for n in range(len(passages) - 1, 0, -1)
    ]
    return calls


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
