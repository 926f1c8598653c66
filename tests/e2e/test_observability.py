"""Observability over HTTP: one trace per request across the deployments (read back from a real
OTLP/HTTP receiver), Ray's Prometheus endpoint serving the hybrid_serve_ metrics, and JSON request
logs; a sensitive query's text in no span and no log line."""

from __future__ import annotations

import json
import re
import secrets
import time

import httpx
import pytest

from hybrid_serve.benchmarks.otlp_receiver import ReceivedSpan
from tests.support.ray_logs import ray_log_lines

pytestmark = pytest.mark.e2e

Q = "What port does the API use?"
DEPLOYMENTS = {"Orchestrator", "Retriever", "SLM", "ClaudeProxy"}


def _complete(trace_id: str, root_name: str, needs: set[str]):
    """Done when the root span and a span of every deployment in `needs` have arrived."""

    def done(spans: list[ReceivedSpan]) -> bool:
        roots = [s for s in spans if s.name == root_name]
        return bool(roots) and needs <= {s.component for s in spans}

    return done


def _by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = _by_name(spans, name)
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def _ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[str]:
    by_id = {s.span_id: s for s in spans}
    out = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        out.append(span.name)
    return out


def _assert_tree(spans: list[ReceivedSpan], root: ReceivedSpan, parent: str = "") -> None:
    """One root (parented to `parent`: the caller's span, or none), every other span's parent in
    the trace, each span id unique."""
    ids = [s.span_id for s in spans]
    assert len(ids) == len(set(ids))
    assert root.parent_span_id == parent
    known = set(ids)
    for s in spans:
        if s is not root:
            assert s.parent_span_id in known, f"{s.name} has a parent outside the trace"


def test_one_answer_is_one_trace_across_four_deployments(client, app):
    app.claude.reset()
    r = client.post("/v1/answer", json={"query": Q, "mode": "slm", "verify": "always"})
    assert r.status_code == 200
    body = r.json()
    trace_id = body["trace_id"]
    spans = app.otlp.wait_for(_complete(trace_id, "POST /v1/answer", DEPLOYMENTS), trace_id)
    assert DEPLOYMENTS <= {s.component for s in spans}, {s.component for s in spans}

    root = _one(spans, "POST /v1/answer")
    _assert_tree(spans, root)
    by_id = {s.span_id: s for s in spans}
    pipeline = _one(spans, "Pipeline.answer")
    search = _by_name(spans, "Retriever.search")[0]
    generate = _one(spans, "SLM.generate")
    verify = _one(spans, "Pipeline.verify")
    claude = _one(spans, "ClaudeProxy.verify")
    # Parenting across processes: the Ray workers' spans hang under the orchestrator's.
    # (FastAPI's own spans may sit between the request's span and the pipeline's.)
    assert _ancestors(pipeline, spans)[-1] == root.name
    assert search.parent_span_id == pipeline.span_id and search.component == "Retriever"
    assert generate.parent_span_id == pipeline.span_id and generate.component == "SLM"
    assert verify.parent_span_id == pipeline.span_id
    assert claude.parent_span_id == verify.span_id and claude.component == "ClaudeProxy"
    assert by_id[claude.parent_span_id].component == "Orchestrator"

    # What an operator asks of a trace: route, confidence, tokens, model, cost, score.
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["hybrid.route"] == body["route"] == pipeline.attributes["hybrid.route"]
    assert pipeline.attributes["hybrid.confidence"] == pytest.approx(body["confidence"])
    assert (
        generate.attributes["gen_ai.usage.output_tokens"] == body["usage"]["slm_completion_tokens"]
    )
    assert generate.attributes["gen_ai.request.model"]
    assert claude.attributes["gen_ai.provider.name"] == "anthropic"
    assert claude.attributes["gen_ai.usage.input_tokens"] > 0
    assert claude.attributes["hybrid.cost_usd"] > 0
    assert claude.attributes["hybrid.verification.score"] == body["verification"]["score"] == 0.9
    assert verify.attributes["hybrid.verification.passed"] is True


def test_incoming_traceparent_continues_the_callers_trace(client, app):
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    r = client.post(
        "/v1/answer",
        json={"query": Q, "mode": "slm", "verify": "never"},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert r.status_code == 200 and r.json()["trace_id"] == trace_id
    spans = app.otlp.wait_for(
        _complete(trace_id, "POST /v1/answer", {"Orchestrator", "Retriever", "SLM"}), trace_id
    )
    root = _one(spans, "POST /v1/answer")
    _assert_tree(spans, root, parent=parent)
    assert {"Orchestrator", "Retriever", "SLM"} <= {s.component for s in spans}


def test_each_subtask_is_its_own_span_with_its_own_slm_call(client, app):
    app.claude.reset()
    app.claude.queue_tool_input(
        "plan_subtasks",
        {
            "subtasks": [
                {"id": "s1", "question": Q, "search_queries": ["port"], "depends_on": []},
                {
                    "id": "s2",
                    "question": "How are documents split into chunks?",
                    "search_queries": ["chunks"],
                    "depends_on": [],
                },
            ]
        },
    )
    r = client.post(
        "/v1/answer",
        json={
            "query": f"{Q} And how are documents chunked?",
            "mode": "decompose",
            "verify": "never",
        },
    )
    assert r.status_code == 200 and len(r.json()["subtasks"]) == 2
    trace_id = r.json()["trace_id"]
    spans = app.otlp.wait_for(
        lambda ss: len(_by_name(ss, "SLM.generate")) >= 2 and _by_name(ss, "POST /v1/answer"),
        trace_id,
    )
    plan = _one(spans, "Pipeline.plan")
    assert plan.attributes["hybrid.planner"] == "claude" and plan.attributes["hybrid.subtasks"] == 2
    assert _one(spans, "ClaudeProxy.plan").parent_span_id == plan.span_id
    subtasks = _by_name(spans, "Pipeline.subtask")
    assert sorted(s.attributes["hybrid.subtask.id"] for s in subtasks) == ["s1", "s2"]
    parents = sorted(s.parent_span_id for s in _by_name(spans, "SLM.generate"))
    assert parents == sorted(s.span_id for s in subtasks)  # one SLM call under each sub-task


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format -> name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(4))))
    return out


def _total(series, **match: str) -> float:
    return sum(v for labels, v in series if all(labels.get(k) == x for k, x in match.items()))


def test_ray_metrics_endpoint_serves_hybrid_serve_series(client, app):
    app.claude.reset()
    for _ in range(2):
        r = client.post("/v1/answer", json={"query": Q, "mode": "slm", "verify": "always"})
        assert r.status_code == 200
    assert client.post("/v1/answer", json={"query": ""}).status_code == 422
    needed = {
        "ray_hybrid_serve_requests_total",
        "ray_hybrid_serve_slm_tokens_total",
        "ray_hybrid_serve_claude_calls_total",
        "ray_hybrid_serve_index_chunks",
        "ray_hybrid_serve_verification_score_count",
    }
    deadline = time.monotonic() + 90
    while True:  # Ray's agents report every few seconds
        m = _scrape(app.metrics_url)
        requests = m.get("ray_hybrid_serve_requests_total", [])
        answered = _total(requests, endpoint="/v1/answer", status="200")
        rejected = _total(requests, endpoint="/v1/answer", status="422", answer_route="none")
        if (needed <= set(m) and answered >= 2 and rejected >= 1) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert needed <= set(m), sorted(k for k in m if "hybrid" in k)
    assert answered >= 2 and rejected >= 1  # refused requests are counted too
    # Serve's own tags come with ours: which deployment and application reported it.
    assert all(labels.get("deployment") == "Orchestrator" for labels, _ in requests)
    assert _total(m["ray_hybrid_serve_slm_tokens_total"], kind="completion") > 0
    assert _total(m["ray_hybrid_serve_claude_calls_total"], role="verify", outcome="ok") >= 2
    assert _total(m["ray_hybrid_serve_claude_tokens_total"], kind="input") > 0
    assert _total(m["ray_hybrid_serve_claude_cost_usd_total"]) > 0
    assert _total(m["ray_hybrid_serve_verification_score_count"]) >= 2
    assert (
        0
        < _total(m["ray_hybrid_serve_verification_score_sum"])
        <= _total(m["ray_hybrid_serve_verification_score_count"])
    )
    assert max(v for _, v in m["ray_hybrid_serve_index_chunks"]) > 0
    assert _total(m["ray_hybrid_serve_claude_circuit_state"]) == 0  # closed
    assert 0 < max(v for _, v in m["ray_hybrid_serve_claude_budget_remaining_usd"])
    assert _total(m["ray_hybrid_serve_request_latency_ms_count"], endpoint="/v1/answer") >= 2


def test_sensitive_query_text_is_in_no_span_and_no_log_line(client, app):
    app.claude.reset()
    marker = f"zircon-{secrets.token_hex(6)}"
    r = client.post(
        "/v1/answer",
        json={"query": f"What is the salary of {marker}?", "sensitive": True, "verify": "always"},
    )
    assert r.status_code == 200
    trace_id = r.json()["trace_id"]
    spans = app.otlp.wait_for(
        _complete(trace_id, "POST /v1/answer", {"Orchestrator", "Retriever", "SLM"}), trace_id
    )
    assert _by_name(spans, "SLM.generate"), "the trace arrived"
    assert app.claude.calls() == []
    assert not app.otlp.contains(marker)

    deadline = time.monotonic() + 30
    while True:  # the request's JSON line, once Ray has flushed the replica's stderr
        lines = ray_log_lines()
        mine = [ln for ln in lines if trace_id in ln and ln.lstrip().startswith("{")]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not [ln for ln in lines if marker in ln]
    assert mine, "one JSON line per request"
    entry = json.loads(mine[0])
    assert entry["msg"] == "request" and entry["endpoint"] == "/v1/answer"
    assert entry["status"] == 200 and entry["answer_route"] == r.json()["route"]
    assert entry["latency_ms"] > 0 and "cost_usd" in entry
