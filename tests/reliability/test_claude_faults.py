"""Claude's faults, from the local Messages-API server through the real SDK: under concurrency the
clients see no 5xx, answers degrade with the right reason, the circuit opens and recovers, spend
never passes the budget, and a sensitive query never reaches the server whatever the faults."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from anthropic import AsyncAnthropic

from hybrid_serve.agents.interfaces import LLMCall, Unavailable
from hybrid_serve.agents.llm_gateway import LLMGateway
from hybrid_serve.config import LLMConfig, PolicyConfig
from hybrid_serve.schemas import Passage
from tests.support.messages_api import Fault, MessagesAPIServer

pytestmark = [pytest.mark.reliability]

CLAUDE_REASONS = {
    "claude_error",
    "claude_rate_limited",
    "claude_malformed_output",
    "claude_circuit_open",
}
Q = "How are documents split into chunks?"


async def _burst(rel, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=rel.url, headers=rel.auth, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/answer", json=b) for b in bodies))


def _usage(rel) -> dict:
    return httpx.get(f"{rel.url}/v1/usage", headers=rel.auth, timeout=30).json()


def _wait_circuit(rel, state: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while _usage(rel)["circuit"] != state:
        assert time.monotonic() < deadline, f"circuit never {state}"
        time.sleep(0.3)


@pytest.mark.e2e
def test_fault_storm_under_concurrency_degrades_and_never_5xx(rel):
    claude = rel.shared.claude
    claude.reset()
    storm = [
        Fault(status=429, retry_after="0.2"),
        Fault(status=529),
        Fault(status=500),
        Fault(reset=True),
        Fault(delay_s=1.5),  # past the 1 s timeout
        Fault(malformed=True),
    ]
    rounds = int(rel.scaled(3, 30))
    for _ in range(rounds):
        claude.inject(*storm * 3)
        bodies = [
            {
                "query": f"{Q} ({i})",
                "mode": "claude" if i % 2 else "auto",
                "verify": "always",
                "use_cache": False,  # every round meets the faults afresh
            }
            for i in range(12)
        ]
        responses = asyncio.run(_burst(rel, bodies))
        assert [r.status_code for r in responses] == [200] * len(bodies), [
            r.text[:200] for r in responses if r.status_code != 200
        ]
        for r in responses:
            body = r.json()
            assert set(body["degraded"]) <= CLAUDE_REASONS | {"ledger_unavailable"}, body
            if body["route"] != "claude" and body["escalation"]["escalated"]:
                assert body["degraded"], body  # fell back to the SLM: it says why
        claude.faults.clear()
        if _usage(rel)["circuit"] == "open":  # the next round starts from a trial call
            _wait_circuit(rel, "half_open", timeout_s=10)
    assert claude.calls(), "the storm reached the server"


@pytest.mark.e2e
def test_circuit_opens_stops_calling_and_recovers(rel):
    claude = rel.shared.claude
    claude.reset()
    time.sleep(2.1)  # a circuit left open by an earlier test half-opens
    claude.inject(*[Fault(status=529)] * 40)
    with httpx.Client(base_url=rel.url, headers=rel.auth, timeout=60) as client:
        reasons: list[list[str]] = []
        for i in range(4):
            r = client.post("/v1/answer", json={"query": f"{Q} #{i}", "mode": "claude"})
            assert r.status_code == 200
            reasons.append(r.json()["degraded"])
        assert "claude_error" in reasons[0] and "claude_circuit_open" in reasons[-1]
        assert _usage(rel)["circuit"] == "open"
        sent = len(claude.calls())
        r = client.post("/v1/answer", json={"query": Q, "mode": "claude"})
        assert "claude_circuit_open" in r.json()["degraded"] and r.json()["route"] == "slm"
        assert len(claude.calls()) == sent  # an open circuit sends nothing
        claude.faults.clear()
        time.sleep(2.1)  # the cooldown: one trial call may pass
        r = client.post("/v1/answer", json={"query": Q, "mode": "claude", "verify": "never"})
        assert r.status_code == 200 and r.json()["route"] == "claude" and not r.json()["degraded"]
    assert _usage(rel)["circuit"] == "closed"


@pytest.mark.e2e
def test_sensitive_queries_never_reach_claude_under_faults_and_retries(rel):
    claude = rel.shared.claude
    claude.reset()
    time.sleep(2.1)
    claude.inject(*[Fault(status=429, retry_after="0.1"), Fault(reset=True)] * 10)
    marker = "Project-Nightjar-7731"
    bodies = []
    for i in range(16):
        if i % 2:
            bodies.append(
                {"query": f"Who leads {marker}? ({i})", "sensitive": True, "mode": "claude"}
            )
        else:
            bodies.append({"query": f"{Q} ({i})", "mode": "claude", "verify": "always"})
    responses = asyncio.run(_burst(rel, bodies))
    assert all(r.status_code == 200 for r in responses)
    assert claude.calls(), "the non-sensitive half did call Claude (with retries)"
    assert not [c for c in claude.calls() if marker in c.text]
    for body, r in zip(bodies, responses):
        if body.get("sensitive"):
            assert r.json()["route"] == "slm" and "sensitive_local_only" in r.json()["degraded"]


# -- the budget, at the one place it is kept ------------------------------------------------

PASSAGES = [Passage(chunk_id="a#0", doc_id="a", title="Paris", text="Paris is in France.")]


def test_budget_holds_under_concurrent_calls():
    """ClaudeProxy is one replica and its gateway reserves each call's worst case before sending:
    however many requests race, spend stays within the day's budget."""
    server = MessagesAPIServer().start()
    try:
        cfg = LLMConfig(
            daily_budget_usd=0.05, request_budget_usd=1.0, max_concurrency=32, max_tokens=200
        )
        client = AsyncAnthropic(api_key="sk-test", base_url=server.url, max_retries=0)
        gateway = LLMGateway(cfg, PolicyConfig(), client)

        async def one(i: int):
            try:
                return await gateway.call(
                    "answer", LLMCall(f"r{i}", "Where is Paris?", PASSAGES, "redact")
                )
            except Unavailable as exc:
                return exc.reason

        async def race():
            return await asyncio.gather(*(one(i) for i in range(60)))

        results = asyncio.run(race())
        ok = [r for r in results if not isinstance(r, str)]
        refused = [r for r in results if isinstance(r, str)]
        spent = sum(r.usage.cost_usd for r in ok)
        assert ok and refused and set(refused) == {"budget_exhausted"}
        assert spent <= cfg.daily_budget_usd
        assert gateway.ledger.spent_today == pytest.approx(spent)
        assert len(server.calls()) == len(ok)  # refused calls were never sent
        assert gateway.ledger.reserved == pytest.approx(0.0, abs=1e-12)
    finally:
        server.stop()
