"""Rate limiter, circuit breaker and spend budget for Claude calls.

They live in one ClaudeProxy replica, and all their check-and-update steps run without an `await`
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

Clock = Callable[[], float]


class TokenBucket:
    """`rate_per_min` units per minute, bursting up to one minute's worth."""

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
    """Requests per minute and tokens per minute, waited for up to `max_wait_s`."""

    def __init__(self, rpm: float, tpm: float, max_wait_s: float, clock: Clock = time.monotonic):
        self.requests = TokenBucket(rpm, clock)
        self.tokens = TokenBucket(tpm, clock)
        self.max_wait_s = max_wait_s

    async def acquire(self, tokens: float, max_wait_s: float | None = None) -> None:
        """`max_wait_s`: a shorter bound for this call (what remains of its request's deadline)."""
        bound = self.max_wait_s if max_wait_s is None else min(self.max_wait_s, max_wait_s)
        deadline = time.monotonic() + bound
        while True:
            wait = max(self.requests.wait_time(1), self.tokens.wait_time(tokens))
            if wait == 0:
                self.requests.take(1)
                self.tokens.take(tokens)
                return
            if time.monotonic() + wait > deadline:
                raise RateLimited(f"local rate limit: would wait {wait:.1f}s")
            await asyncio.sleep(wait)


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
