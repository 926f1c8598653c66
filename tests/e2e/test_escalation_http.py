"""Escalation, policies and the cost ledger over HTTP, with ClaudeProxy calling the local
Messages-API server through the real SDK."""

import pytest

from hybrid_serve.agents.citations import markers

pytestmark = pytest.mark.e2e

Q = "How are documents split into chunks?"


def test_mode_claude_answers_with_valid_citations_and_cost(client, app):
    before = len(app.claude.calls())
    app.claude.answer_text = "Documents are split into overlapping chunks [1]. Extra [9]."
    r = client.post("/v1/answer", json={"query": Q, "mode": "claude", "verify": "never"}).json()
    assert r["route"] == "claude" and r["escalation"]["escalated"]
    assert len(app.claude.calls()) == before + 1
    assert "[9]" not in r["answer"]  # a number with no passage is dropped
    assert set(markers(r["answer"])) == {c["number"] for c in r["citations"]}
    u = r["usage"]
    assert u["claude_input_tokens"] > 0 and u["claude_output_tokens"] > 0 and u["cost_usd"] > 0


def test_sensitive_request_never_reaches_claude(client, app):
    app.claude.reset()
    secret = "payroll of the Zurich office"
    r = client.post(
        "/v1/answer",
        json={
            "query": f"What is the {secret}?",
            "sensitive": True,
            "verify": "always",
            "mode": "auto",
        },
    )
    assert r.status_code == 200
    assert app.claude.calls() == []
    assert "sensitive_local_only" in r.json()["degraded"]
    r = client.post(
        "/v1/answer", json={"query": f"What is the {secret}?", "mode": "claude", "sensitive": True}
    )
    assert app.claude.calls() == [] and r.json()["route"] == "slm"


def test_verification_always(client, app):
    app.claude.reset()
    r = client.post("/v1/answer", json={"query": Q, "mode": "slm", "verify": "always"}).json()
    # mode slm never escalates, but an explicit verify=always still asks Claude to grade
    assert r["verification"]["score"] == 0.9 and r["verification"]["passed"] is True
    assert len(app.claude.calls("grade_answer")) == 1


def test_usage_totals_show_the_saving(client, app):
    client.post("/v1/answer", json={"query": Q, "mode": "slm", "verify": "never"})
    body = client.get("/v1/usage").json()
    t = body["totals"]
    assert t["requests"] >= 1 and t["all_claude_cost_usd_estimate"] > 0
    assert body["budget_remaining_usd"] > 0 and body["circuit"] == "closed"


@pytest.mark.parametrize(
    "payload,needle",
    [
        ({"query": "q", "mode": "gpt"}, "mode"),
        ({"query": "q", "verify": "sometimes"}, "verify"),
        ({"query": "q", "sensitive": "yes"}, "sensitive"),
        ({"query": "q", "pii": "hide"}, "pii"),
    ],
)
def test_bad_policy_fields(client, payload, needle):
    r = client.post("/v1/answer", json=payload)
    assert r.status_code == 422 and needle in r.json()["error"]["message"]
