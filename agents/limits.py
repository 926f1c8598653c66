"""Rate limiter, circuit breaker and spend budget for the LLM tier's calls, and the limits of
API keys.

They live in one LLMProxy replica, and all their check-and-update steps run without an `await`
in between, so on its single event loop they are atomic: concurrent requests cannot overspend.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from aiolimiter import AsyncLimiter

Clock = Callable[[], float]


class TokenBucket:
    """`rate_per_min` units per minute, bursting up to one minute's worth. Hand-written for
    KeyLimits' admission, which must answer at once with the time until the next token (a 429's
    Retry-After); aiolimiter, which RateLimiter uses, waits instead of saying how long."""

    def __init__(self, rate_per_min: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate_per_min / 60.0
        self.capacity = rate_per_min
        self.level = rate_per_min
        self.clock = clock
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` is available (inf if it never fits)."""
        self._refill()
        amount = min(amount, self.capacity)
        if self.level >= amount:
            return 0.0
        return (amount - self.level) / self.rate if self.rate > 0 else math.inf

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= min(amount, self.capacity)


class RateLimited(Exception):
    pass


class RateLimiter:
    """Requests per minute and tokens per minute (aiolimiter's leaky buckets, a minute's burst),
    waited for up to `max_wait_s`: a call that would wait longer fails instead of holding its
    request. The buckets belong to the event loop that uses them (a replica has one)."""

    def __init__(self, rpm: float, tpm: float, max_wait_s: float) -> None:
        self.rpm, self.tpm, self.max_wait_s = rpm, tpm, max_wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = AsyncLimiter(rpm, 60)
        self.tokens = AsyncLimiter(tpm, 60)

    def _buckets(self) -> tuple[AsyncLimiter, AsyncLimiter]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # another loop (a test's): fresh buckets for it
                self.requests, self.tokens = AsyncLimiter(self.rpm, 60), AsyncLimiter(self.tpm, 60)
            self._loop = loop
        return self.requests, self.tokens

    async def acquire(self, tokens: float, max_wait_s: float | None = None) -> None:
        """`max_wait_s`: a shorter bound for this call (what remains of its request's deadline)."""
        bound = self.max_wait_s if max_wait_s is None else min(self.max_wait_s, max_wait_s)
        requests, token_bucket = self._buckets()
        tokens = min(tokens, token_bucket.max_rate)  # a call over a minute's worth waits a minute
        try:
            async with asyncio.timeout(bound):
                await requests.acquire()
                await token_bucket.acquire(tokens)
        except TimeoutError:
            raise RateLimited(f"local rate limit: no capacity within {bound:.1f}s") from None

    def reconfigure(self, rpm: float, tpm: float, max_wait_s: float) -> None:
        if (rpm, tpm) != (self.rpm, self.tpm):
            self.requests, self.tokens = AsyncLimiter(rpm, 60), AsyncLimiter(tpm, 60)
        self.rpm, self.tpm, self.max_wait_s = rpm, tpm, max_wait_s


State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `cooldown_s`, one trial call passes."""

    def __init__(self, failures: int, cooldown_s: float, clock: Clock = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.trial_in_flight = False

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def success(self) -> None:
        self.consecutive = 0
        self.opened_at = None
        self.trial_in_flight = False

    def failure(self) -> None:
        self.consecutive += 1
        if self.trial_in_flight or self.consecutive >= self.threshold:
            self.opened_at = self.clock()
        self.trial_in_flight = False

    def release_trial(self) -> None:
        """A trial call that ended without a verdict (e.g. cancelled) frees the slot."""
        self.trial_in_flight = False


class BudgetExhausted(Exception):
    pass


@dataclass
class Totals:
    requests: int = 0
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    slm_cost_usd: float = 0.0
    all_claude_cost_usd_estimate: float = 0.0


@dataclass
class Ledger:
    """Spend per UTC day and per request, with reservations so checks hold under concurrency.

    Before a call, its worst case (input estimate + max output) is reserved; after it, the
    reservation is replaced by the real cost. A call is refused if the reservation would push the
    day's or the request's spend over its budget.
    """

    daily_budget_usd: float
    request_budget_usd: float
    path: Path | None = None
    day: str = ""
    spent_today: float = 0.0
    reserved: float = 0.0
    per_request: dict[str, float] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)

    def __post_init__(self) -> None:
        self._load()
        self._roll()

    def _roll(self) -> None:
        today = dt.datetime.now(dt.UTC).date().isoformat()
        if today != self.day:
            self.day = today
            self.spent_today = 0.0
            self.per_request.clear()

    def remaining_today(self) -> float:
        self._roll()
        return self.peek_remaining()

    def peek_remaining(self) -> float:
        """The same without rolling the day over: a read, safe from a metrics thread."""
        today = dt.datetime.now(dt.UTC).date().isoformat()
        spent = self.spent_today if today == self.day else 0.0
        return max(0.0, self.daily_budget_usd - spent - self.reserved)

    def reserve(self, request_id: str, worst_case_usd: float) -> None:
        self._roll()
        if self.spent_today + self.reserved + worst_case_usd > self.daily_budget_usd:
            raise BudgetExhausted("daily Claude budget exhausted")
        if self.per_request.get(request_id, 0.0) + worst_case_usd > self.request_budget_usd:
            raise BudgetExhausted("per-request Claude budget exhausted")
        self.reserved += worst_case_usd
        self.per_request[request_id] = self.per_request.get(request_id, 0.0) + worst_case_usd

    def settle(self, request_id: str, reserved_usd: float, actual_usd: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved_usd)
        self.spent_today += actual_usd
        if request_id in self.per_request:
            self.per_request[request_id] += actual_usd - reserved_usd
        self.totals.cost_usd += actual_usd
        self._save()

    def forget(self, request_id: str) -> None:
        self.per_request.pop(request_id, None)

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"day": self.day, "spent_today": self.spent_today, "totals": asdict(self.totals)}
            )
        )
        os.replace(tmp, self.path)

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            self.day = data["day"]
            self.spent_today = float(data["spent_today"])
            self.totals = Totals(**data["totals"])
        except (ValueError, KeyError, TypeError):
            pass  # a corrupt ledger starts a new day's count rather than blocking start-up


@dataclass
class KeyUsage:
    """One API key's counts: since start-up, and its Claude spend today (UTC)."""

    requests: int = 0
    rate_limited: int = 0
    cache_hits: int = 0
    budget_degraded: int = 0
    claude_cost_usd: float = 0.0
    slm_cost_usd: float = 0.0
    saved_usd: float = 0.0
    day: str = ""
    claude_cost_usd_today: float = 0.0


@dataclass
class Admission:
    allowed: bool
    retry_after_s: float = 0.0
    budget_exhausted: bool = False


class KeyLimits:
    """Requests per minute and daily Claude budget per API key, for the whole cluster (it lives
    in one replica, and its check-and-update steps have no `await` in between).

    The budget is checked when a request is admitted and charged when it ends, so requests
    admitted together may pass it by at most their own budgets (llm.request_budget_usd each).
    Keys are known by label only (a name, or a prefix of the key's hash); the day's spend is kept
    in `path` so a restart does not reset it.
    """

    def __init__(
        self,
        limits: dict[str, tuple[float | None, float | None]],
        path: Path | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        """`limits`: label -> (requests per minute, daily Claude budget in USD), None: no limit."""
        self.clock = clock
        self.limits: dict[str, tuple[float | None, float | None]] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.usage: dict[str, KeyUsage] = {}
        self.path = path
        self.reconfigure(limits)
        self._load()

    def reconfigure(self, limits: dict[str, tuple[float | None, float | None]]) -> None:
        """New keys and limits in place: a key whose rate is unchanged keeps its bucket, every
        key its usage of the day."""
        for label, (rpm, _) in limits.items():
            if not rpm:
                self.buckets.pop(label, None)
            elif self.limits.get(label, (None, None))[0] != rpm:
                self.buckets[label] = TokenBucket(rpm, self.clock)
            self.usage.setdefault(label, KeyUsage())
        for label in set(self.buckets) - set(limits):
            del self.buckets[label]
        self.limits = dict(limits)

    def _today(self, usage: KeyUsage) -> KeyUsage:
        today = dt.datetime.now(dt.UTC).date().isoformat()
        if usage.day != today:
            usage.day, usage.claude_cost_usd_today = today, 0.0
        return usage

    def admit(self, label: str) -> Admission:
        usage = self._today(self.usage.setdefault(label, KeyUsage()))
        bucket = self.buckets.get(label)
        if bucket is not None:
            wait = bucket.wait_time(1)
            if wait > 0:
                usage.rate_limited += 1
                return Admission(False, retry_after_s=wait)
            bucket.take(1)
        usage.requests += 1
        budget = self.limits.get(label, (None, None))[1]
        exhausted = budget is not None and usage.claude_cost_usd_today >= budget
        usage.budget_degraded += exhausted
        return Admission(True, budget_exhausted=exhausted)

    def record(
        self, label: str, claude_usd: float, slm_usd: float, saved_usd: float, cache_hit: bool
    ) -> None:
        usage = self._today(self.usage.setdefault(label, KeyUsage()))
        usage.claude_cost_usd += claude_usd
        usage.claude_cost_usd_today += claude_usd
        usage.slm_cost_usd += slm_usd
        usage.saved_usd += saved_usd
        usage.cache_hits += cache_hit
        if claude_usd:
            self._save()

    def report(self) -> dict[str, dict[str, float | int | str | None]]:
        out: dict[str, dict[str, float | int | str | None]] = {}
        for label, usage in self.usage.items():
            rpm, budget = self.limits.get(label, (None, None))
            u = self._today(usage)
            out[label] = {
                **asdict(u),
                "requests_per_minute": rpm,
                "daily_claude_budget_usd": budget,
                "claude_budget_remaining_usd": (
                    None if budget is None else max(0.0, budget - u.claude_cost_usd_today)
                ),
            }
        return out

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        days = {k: [u.day, u.claude_cost_usd_today] for k, u in self.usage.items()}
        tmp.write_text(json.dumps(days))
        os.replace(tmp, self.path)

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            for label, (day, spent) in json.loads(self.path.read_text()).items():
                usage = self.usage.setdefault(label, KeyUsage())
                usage.day, usage.claude_cost_usd_today = str(day), float(spent)
        except (ValueError, TypeError, AttributeError):
            pass  # a corrupt file starts the day's count again rather than blocking start-up
