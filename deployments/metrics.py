"""Application metrics through Ray Serve's metrics API: they appear on every node's Ray metrics
endpoint (Prometheus format) beside Serve's own, tagged with deployment, replica and application.

Ray prefixes custom metrics with `ray_`: `hybrid_serve_requests_total` is scraped as
`ray_hybrid_serve_requests_total`. CATALOGUE is the one list of names: the Grafana dashboard in
`k8s/monitoring/` is rendered from it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybrid_serve.schemas import AnswerResponse

LATENCY_MS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]
SCORE = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
WAIT_S = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120]
TOKENS_PER_S = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()
    unit: str = ""


CATALOGUE: tuple[MetricSpec, ...] = (
    # Orchestrator: one per HTTP request.
    MetricSpec(
        "hybrid_serve_requests_total",
        "counter",
        "HTTP requests by endpoint, answer route (slm, slm+rewrite, claude, decomposed; none "
        "for other endpoints and errors) and status code.",
        ("endpoint", "answer_route", "status"),
    ),
    MetricSpec(
        "hybrid_serve_request_latency_ms",
        "histogram",
        "HTTP request latency (to the last byte of the response) by endpoint and answer route.",
        ("endpoint", "answer_route"),
        tuple(LATENCY_MS),
        "ms",
    ),
    MetricSpec(
        "hybrid_serve_escalations_total",
        "counter",
        "Escalations to Claude by reason (low_confidence, complex_query, mode_claude, ...).",
        ("reason",),
    ),
    MetricSpec(
        "hybrid_serve_degraded_total",
        "counter",
        "Answers given degraded, by reason (claude_unavailable, budget_exhausted, ...).",
        ("reason",),
    ),
    MetricSpec(
        "hybrid_serve_deadline_cut_total",
        "counter",
        "Steps cut short or skipped so that an answer met its deadline, by step (plan, "
        "subtasks, escalate, claude, verify).",
        ("step",),
    ),
    MetricSpec(
        "hybrid_serve_deadline_exceeded_total",
        "counter",
        "Requests answered 504 because nothing was ready by their deadline, by the step it ran "
        "out in (retrieve, generate, subtasks; request when outside the pipeline).",
        ("step",),
    ),
    MetricSpec(
        "hybrid_serve_verification_score",
        "histogram",
        "Claude's 0-1 verification score of the final answer.",
        (),
        tuple(SCORE),
    ),
    MetricSpec(
        "hybrid_serve_subtask_latency_ms",
        "histogram",
        "Latency of each decomposed sub-task by status (ok, failed, timeout).",
        ("status",),
        tuple(LATENCY_MS),
        "ms",
    ),
    MetricSpec(
        "hybrid_serve_replica_retries_total",
        "counter",
        "Reads repeated because the replica serving them died, by target deployment.",
        ("target",),
    ),
    MetricSpec(
        "hybrid_serve_request_cost_usd_total",
        "counter",
        "Cost of answered requests by kind: claude (spent), slm (replica time), "
        "all_claude_estimate (what Claude alone would have cost).",
        ("kind",),
        unit="usd",
    ),
    MetricSpec(
        "hybrid_serve_answer_cache_total",
        "counter",
        "Answer-cache lookups by result: hit, miss, bypass (not cacheable, or the client asked).",
        ("result",),
    ),
    MetricSpec(
        "hybrid_serve_answer_cache_saved_usd_total",
        "counter",
        "What the cache hits would have cost again (Claude spend + SLM replica time).",
        (),
        unit="usd",
    ),
    MetricSpec(
        "hybrid_serve_shadow_verdicts_total",
        "counter",
        "Claude's background grades of answers kept on the SLM (escalation.shadow_verify_share),"
        " by verdict (right, wrong: below escalation.verify_min_score): the kept-answer error "
        "rate is wrong / (right + wrong).",
        ("verdict",),
    ),
    MetricSpec(
        "hybrid_serve_key_rate_limited_total",
        "counter",
        "Requests refused 429 by their API key's requests_per_minute, by key label.",
        ("key",),
    ),
    # AnswerCache.
    MetricSpec("hybrid_serve_answer_cache_entries", "gauge", "Answers held by the cache."),
    # SLM replicas.
    MetricSpec(
        "hybrid_serve_slm_tokens_total",
        "counter",
        "SLM tokens by kind (prompt, completion).",
        ("kind",),
    ),
    MetricSpec(
        "hybrid_serve_slm_tokens_per_second",
        "histogram",
        "SLM decode rate of each generation (completion tokens / generation time).",
        (),
        tuple(TOKENS_PER_S),
    ),
    MetricSpec(
        "hybrid_serve_refusals_total",
        "counter",
        "Requests refused at once for want of capacity, by reason (deadline: the SLM replica "
        "found it could not finish inside its deadline; on_arrival: the SLM had just refused one "
        "like it, so it was refused before retrieval) and priority (interactive, batch).",
        ("reason", "priority"),
    ),
    MetricSpec(
        "hybrid_serve_slm_expected_wait_seconds",
        "histogram",
        "Expected wait for an SLM slot when a generation arrives (compare with the deadlines).",
        (),
        tuple(WAIT_S),
        "s",
    ),
    MetricSpec(
        "hybrid_serve_slm_deadline_seconds",
        "histogram",
        "What remained of the request's deadline when its generation reached the SLM replica.",
        (),
        tuple(WAIT_S),
        "s",
    ),
    # ClaudeProxy.
    MetricSpec(
        "hybrid_serve_claude_calls_total",
        "counter",
        "Claude calls by role (rewrite, plan, answer, verify) and outcome (ok or the "
        "degraded reason).",
        ("role", "outcome"),
    ),
    MetricSpec(
        "hybrid_serve_claude_tokens_total",
        "counter",
        "Claude tokens by kind (input, output, cache_read, cache_write).",
        ("kind",),
    ),
    MetricSpec(
        "hybrid_serve_claude_cost_usd_total", "counter", "USD spent on Claude.", (), unit="usd"
    ),
    MetricSpec(
        "hybrid_serve_claude_retries_total",
        "counter",
        "Claude HTTP attempts beyond the first (429, 529, 5xx, timeouts).",
    ),
    MetricSpec(
        "hybrid_serve_claude_circuit_state",
        "gauge",
        "Circuit breaker: 0 closed, 1 half-open, 2 open.",
    ),
    MetricSpec(
        "hybrid_serve_claude_budget_remaining_usd",
        "gauge",
        "Claude budget left today.",
        unit="usd",
    ),
    # Retriever.
    MetricSpec("hybrid_serve_index_documents", "gauge", "Documents in the index version served."),
    MetricSpec("hybrid_serve_index_chunks", "gauge", "Chunks in the index version served."),
    MetricSpec("hybrid_serve_index_version", "gauge", "Version of the index served."),
    MetricSpec(
        "hybrid_serve_index_segments",
        "gauge",
        "Segments of the index version served (compaction keeps them few).",
    ),
    MetricSpec(
        "hybrid_serve_retrieval_latency_ms",
        "histogram",
        "Hybrid search latency inside the retriever.",
        (),
        tuple(LATENCY_MS),
        "ms",
    ),
)
BY_NAME = {m.name: m for m in CATALOGUE}


class _Unrecorded:
    """Outside a Serve replica (the ingress under unit test) there is nowhere to report to."""

    def inc(self, value: float, tags: Any = None) -> None: ...

    def set(self, value: float, tags: Any = None) -> None: ...

    def observe(self, value: float, tags: Any = None) -> None: ...


class Metrics:
    """The catalogue's metrics, made in this replica on first use (Ray Serve metrics need the
    replica context for their default tags)."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}
        self._in_replica: bool | None = None

    def _replica(self) -> bool:
        if self._in_replica is None:
            from ray import serve
            from ray.serve.exceptions import RayServeException

            try:
                serve.get_replica_context()
                self._in_replica = True
            except RayServeException:
                self._in_replica = False
        return self._in_replica

    def _get(self, name: str) -> Any:
        made = self._made.get(name)
        if made is None:
            from ray.serve import metrics

            if not self._replica():
                return _Unrecorded()

            spec = BY_NAME[name]
            tags: Any = spec.tags  # Ray annotates tag_keys as a one-element tuple
            if spec.kind == "counter":
                made = metrics.Counter(name, spec.description, tag_keys=tags)
            elif spec.kind == "gauge":
                made = metrics.Gauge(name, spec.description, tag_keys=tags)
            else:
                made = metrics.Histogram(
                    name, spec.description, boundaries=list(spec.boundaries), tag_keys=tags
                )
            self._made[name] = made
        return made

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:
            self._get(name).inc(value, tags=tags or None)

    def set(self, name: str, value: float, **tags: str) -> None:
        self._get(name).set(value, tags=tags or None)

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._get(name).observe(value, tags=tags or None)


metrics = Metrics()
GAUGE_REFRESH_S = 5.0


def keep_gauges_fresh(update: Callable[[], object], interval_s: float = GAUGE_REFRESH_S) -> None:
    """Set a replica's gauges every few seconds from a daemon thread: Ray drops a gauge series
    that has not been set for two report intervals, and state such as the circuit breaker
    changes with time alone. `update` must be safe to call from another thread."""

    def loop() -> None:
        while True:
            try:
                update()
            except Exception:  # a metric is never worth a replica
                pass
            time.sleep(interval_s)

    threading.Thread(target=loop, daemon=True, name="hybrid-serve-gauges").start()


def record_answer(answer: AnswerResponse) -> dict[str, Any]:
    """An answer's metrics; returns its outcome for the request's log line (no text in it)."""
    esc, usage = answer.escalation, answer.usage
    if esc.escalated:
        for reason in esc.reasons:
            metrics.inc("hybrid_serve_escalations_total", reason=reason)
    for reason in answer.degraded:
        metrics.inc("hybrid_serve_degraded_total", reason=reason)
    for step in answer.deadline.cut if answer.deadline else ():
        metrics.inc("hybrid_serve_deadline_cut_total", step=step)
    if answer.verification is not None:
        metrics.observe("hybrid_serve_verification_score", answer.verification.score)
    for st in answer.subtasks:
        metrics.observe("hybrid_serve_subtask_latency_ms", st.latency_ms, status=st.status)
    metrics.inc("hybrid_serve_request_cost_usd_total", usage.cost_usd, kind="claude")
    metrics.inc("hybrid_serve_request_cost_usd_total", usage.slm_cost_usd, kind="slm")
    metrics.inc(
        "hybrid_serve_request_cost_usd_total",
        usage.all_claude_cost_usd_estimate,
        kind="all_claude_estimate",
    )
    return {
        "answer_route": answer.route,
        "confidence": answer.confidence,
        "escalated": esc.escalated,
        "reasons": esc.reasons,
        "degraded": answer.degraded,
        "cost_usd": round(usage.cost_usd + usage.slm_cost_usd, 8),
        "verification_score": answer.verification.score if answer.verification else None,
        "subtasks": len(answer.subtasks),
        "tokens_in": usage.slm_prompt_tokens + usage.claude_input_tokens,
        "tokens_out": usage.slm_completion_tokens + usage.claude_output_tokens,
    }
