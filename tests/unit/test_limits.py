import asyncio

import pytest

from hybrid_serve.agents.limits import (
    BudgetExhausted,
    CircuitBreaker,
    Ledger,
    RateLimited,
    RateLimiter,
    TokenBucket,
)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_token_bucket_refills_at_rate():
    clock = Clock()
    b = TokenBucket(60, clock)  # one per second, burst 60
    b.take(60)
    assert b.wait_time(1) == pytest.approx(1.0)
    clock.t = 2.0
    assert b.wait_time(2) == 0.0


def test_rate_limiter_gives_up_past_max_wait():
    limiter = RateLimiter(rpm=1, tpm=1000, max_wait_s=0.05)

    async def twice() -> None:
        await limiter.acquire(10)
        await limiter.acquire(10)  # the next request slot is a minute away

    with pytest.raises(RateLimited):
        asyncio.run(twice())


def test_circuit_opens_half_opens_and_closes():
    clock = Clock()
    cb = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    for _ in range(3):
        assert cb.allow()
        cb.failure()
    assert cb.state == "open" and not cb.allow()
    clock.t = 10
    assert cb.state == "half_open"
    assert cb.allow() and not cb.allow()  # exactly one trial
    cb.failure()
    assert cb.state == "open"
    clock.t = 20
    assert cb.allow()
    cb.success()
    assert cb.state == "closed" and cb.allow()


def test_ledger_reservations_hold_under_concurrency(tmp_path):
    ledger = Ledger(daily_budget_usd=1.0, request_budget_usd=0.5, path=tmp_path / "l.json")

    async def spend(i):
        try:
            ledger.reserve(f"r{i}", 0.3)
        except BudgetExhausted:
            return False
        await asyncio.sleep(0.01)  # the call in flight
        ledger.settle(f"r{i}", 0.3, 0.25)
        return True

    async def run():
        return await asyncio.gather(*(spend(i) for i in range(10)))

    ok = asyncio.run(run())
    assert sum(ok) == 3  # 3 x 0.3 reserved fits in 1.0; the 4th would not
    assert ledger.spent_today == pytest.approx(0.75) and ledger.spent_today <= 1.0
    again = Ledger(daily_budget_usd=1.0, request_budget_usd=0.5, path=tmp_path / "l.json")
    assert again.spent_today == pytest.approx(0.75)  # survives a restart


def test_per_request_budget():
    ledger = Ledger(daily_budget_usd=10, request_budget_usd=0.1)
    ledger.reserve("a", 0.08)
    with pytest.raises(BudgetExhausted, match="per-request"):
        ledger.reserve("a", 0.05)
    ledger.reserve("b", 0.05)


def test_key_limits_rate_budget_and_persistence(tmp_path):
    from hybrid_serve.agents.limits import KeyLimits

    now = [0.0]
    path = tmp_path / "keys.json"
    limits = {"team-a": (2.0, None), "team-b": (None, 0.05)}
    k = KeyLimits(limits, path, clock=lambda: now[0])
    assert k.admit("team-a").allowed and k.admit("team-a").allowed
    refused = k.admit("team-a")
    assert not refused.allowed and refused.retry_after_s == pytest.approx(30.0)
    now[0] = 30.0
    assert k.admit("team-a").allowed  # one request per 30 s refills
    assert not k.admit("team-b").budget_exhausted
    k.record("team-b", claude_usd=0.05, slm_usd=0.001, saved_usd=0.0, cache_hit=False)
    assert k.admit("team-b").budget_exhausted
    report = k.report()
    assert report["team-a"]["rate_limited"] == 1 and report["team-a"]["requests"] == 3
    assert report["team-b"]["claude_budget_remaining_usd"] == 0.0
    again = KeyLimits(limits, path, clock=lambda: now[0])  # a restart keeps today's spend
    assert again.admit("team-b").budget_exhausted
