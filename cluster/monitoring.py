"""Prometheus Operator and Grafana manifests for the metrics in `deployments.metrics.CATALOGUE`.

`hybrid-serve k8s monitoring --out k8s/monitoring` writes a PodMonitor that scrapes Ray's metrics
port on the head and every worker of the RayService, and a Grafana dashboard (as JSON to import,
and as a ConfigMap that the kube-prometheus-stack Grafana sidecar loads by its label).
"""

from __future__ import annotations

import json
from typing import Any

from hybrid_serve.cluster.k8s import for_kubernetes, object_metadata
from hybrid_serve.config import HybridServeConfig

PROM = "ray_"  # Ray prefixes every custom metric on its Prometheus endpoint
DASHBOARD_UID = "hybrid-serve"
RATE = "[$__rate_interval]"


def render_podmonitor(cfg: HybridServeConfig) -> dict[str, Any]:
    cfg = for_kubernetes(cfg)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": object_metadata(cfg, f"{cfg.k8s.name}-ray", "monitoring"),
        "spec": {
            "jobLabel": "ray.io/cluster",
            # Head and workers alike: each runs a metrics agent for the replicas on its node.
            "selector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "hybrid-serve",
                    "ray.io/is-ray-node": "yes",
                }
            },
            "podMetricsEndpoints": [
                {
                    "port": "metrics",
                    "interval": "15s",
                    "relabelings": [
                        {
                            "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"],
                            "targetLabel": "ray_node_type",
                        },
                        {
                            "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                            "targetLabel": "ray_io_cluster",
                        },
                    ],
                }
            ],
        },
    }


def _m(name: str) -> str:
    return PROM + name


def _panel(
    title: str,
    exprs: list[tuple[str, str]],
    x: int,
    y: int,
    unit: str = "short",
    kind: str = "timeseries",
    w: int = 12,
    h: int = 8,
    description: str = "",
) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, (expr, legend) in enumerate(exprs)
        ],
    }


def _quantiles(metric: str, by: str = "", where: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    label = f"{{{{{by}}}}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({_m(metric)}_bucket{{{where}}}{RATE})))",
            f"{label}p{int(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


# The window the kept-answer error rate is estimated over: a few percent of a day's answers.
SHADOW_WINDOW = "[1d]"


def _kept_error_rate() -> list[tuple[str, str]]:
    """Shadow verdicts' wrong share over the window with its 95 % Wilson interval, in PromQL
    from the summed counters (per-replica estimates could not be combined; counts can)."""
    metric = _m("hybrid_serve_shadow_verdicts_total")
    wrong = f'sum(increase({metric}{{verdict="wrong"}}{SHADOW_WINDOW}))'
    n = f"sum(increase({metric}{SHADOW_WINDOW}))"
    p = f"({wrong} / {n})"
    z2 = 1.96**2
    centre = f"(({p} + {z2 / 2:.4f} / {n}) / (1 + {z2:.4f} / {n}))"
    half = (
        f"(1.96 * sqrt({p} * (1 - {p}) / {n} + {z2 / 4:.4f} / ({n} * {n})) / (1 + {z2:.4f} / {n}))"
    )
    return [
        (p, "kept-answer error rate"),
        (f"clamp_min({centre} - {half}, 0)", "95 % lower"),
        (f"clamp_max({centre} + {half}, 1)", "95 % upper"),
    ]


def render_dashboard() -> dict[str, Any]:
    """Why was a request slow, why did it escalate, what did it cost: one row each."""
    answers = 'endpoint=~"/v1/answer|/v1/chat/completions"'
    panels = [
        _panel(
            "Requests / s by answer route",
            [
                (
                    f"sum by (answer_route) (rate({_m('hybrid_serve_requests_total')}"
                    f"{{{answers}}}{RATE}))",
                    "{{answer_route}}",
                )
            ],
            0,
            0,
            "reqps",
        ),
        _panel(
            "Non-2xx responses / s by status and endpoint",
            [
                (
                    f"sum by (status, endpoint) (rate({_m('hybrid_serve_requests_total')}"
                    f'{{status!~"2.."}}{RATE}))',
                    "{{status}} {{endpoint}}",
                )
            ],
            12,
            0,
            "reqps",
        ),
        _panel(
            "Reads repeated after a replica died / s",
            [
                (
                    f"sum by (target) (rate({_m('hybrid_serve_replica_retries_total')}{RATE}))",
                    "{{target}}",
                )
            ],
            0,
            56,
            "reqps",
        ),
        _panel(
            "Answer latency",
            _quantiles("hybrid_serve_request_latency_ms", "answer_route", answers),
            0,
            8,
            "ms",
        ),
        _panel(
            "Sub-task latency by status",
            _quantiles("hybrid_serve_subtask_latency_ms", "status"),
            12,
            8,
            "ms",
        ),
        _panel(
            "Escalations / s by reason",
            [
                (
                    f"sum by (reason) (rate({_m('hybrid_serve_escalations_total')}{RATE}))",
                    "{{reason}}",
                )
            ],
            0,
            16,
            "reqps",
        ),
        _panel(
            "Degraded answers / s by reason",
            [
                (
                    f"sum by (reason) (rate({_m('hybrid_serve_degraded_total')}{RATE}))",
                    "{{reason}}",
                )
            ],
            12,
            16,
            "reqps",
        ),
        _panel(
            "Cost per hour: Claude, SLM, and Claude alone (estimate)",
            [
                (
                    f"sum by (kind) (rate({_m('hybrid_serve_request_cost_usd_total')}{RATE}))"
                    " * 3600",
                    "{{kind}}",
                ),
                (
                    f"sum(rate({_m('hybrid_serve_claude_cost_usd_total')}{RATE})) * 3600",
                    "Claude (proxy ledger)",
                ),
            ],
            0,
            24,
            "currencyUSD",
        ),
        _panel(
            "Saving: Claude-alone estimate / actual cost",
            [
                (
                    f"sum(rate({_m('hybrid_serve_request_cost_usd_total')}"
                    f'{{kind="all_claude_estimate"}}{RATE})) / sum(rate('
                    f"{_m('hybrid_serve_request_cost_usd_total')}"
                    f'{{kind=~"claude|slm"}}{RATE}))',
                    "saving ×",
                )
            ],
            12,
            24,
            "none",
            kind="stat",
            w=6,
        ),
        _panel(
            "Claude budget remaining today",
            [(f"min({_m('hybrid_serve_claude_budget_remaining_usd')})", "USD")],
            18,
            24,
            "currencyUSD",
            kind="stat",
            w=6,
        ),
        _panel(
            "Claude tokens / s by kind",
            [
                (
                    f"sum by (kind) (rate({_m('hybrid_serve_claude_tokens_total')}{RATE}))",
                    "{{kind}}",
                )
            ],
            0,
            32,
        ),
        _panel(
            "Claude calls / s by role and outcome; retries",
            [
                (
                    f"sum by (role, outcome) (rate({_m('hybrid_serve_claude_calls_total')}{RATE}))",
                    "{{role}} {{outcome}}",
                ),
                (f"sum(rate({_m('hybrid_serve_claude_retries_total')}{RATE}))", "retries"),
            ],
            12,
            32,
            "reqps",
        ),
        _panel(
            "Claude circuit breaker (0 closed, 1 half-open, 2 open)",
            [(f"max({_m('hybrid_serve_claude_circuit_state')})", "state")],
            0,
            40,
            kind="stat",
            w=6,
        ),
        _panel(
            "Verification score",
            _quantiles("hybrid_serve_verification_score"),
            6,
            40,
            "percentunit",
            w=6,
        ),
        _panel(
            "SLM tokens / s (all replicas) and decode rate per generation",
            [
                (
                    f"sum by (kind) (rate({_m('hybrid_serve_slm_tokens_total')}{RATE}))",
                    "{{kind}} tokens/s",
                ),
                *_quantiles("hybrid_serve_slm_tokens_per_second")[:2],
            ],
            12,
            40,
        ),
        _panel(
            "Index: documents, chunks, version, segments",
            [
                (f"max({_m('hybrid_serve_index_documents')})", "documents"),
                (f"max({_m('hybrid_serve_index_chunks')})", "chunks"),
                (f"max({_m('hybrid_serve_index_version')})", "version"),
                (f"max({_m('hybrid_serve_index_segments')})", "segments"),
            ],
            0,
            48,
            kind="stat",
        ),
        _panel(
            "Retrieval latency",
            _quantiles("hybrid_serve_retrieval_latency_ms"),
            12,
            48,
            "ms",
        ),
        _panel(
            "Deadlines / s: steps cut to answer in time, and 504s, by step",
            [
                (
                    f"sum by (step) (rate({_m('hybrid_serve_deadline_cut_total')}{RATE}))",
                    "cut: {{step}}",
                ),
                (
                    f"sum by (step) (rate({_m('hybrid_serve_deadline_exceeded_total')}{RATE}))",
                    "504: {{step}}",
                ),
            ],
            0,
            56,
            "reqps",
        ),
        _panel(
            "Answer cache: lookups / s by result; saved USD per hour; entries",
            [
                (
                    f"sum by (result) (rate({_m('hybrid_serve_answer_cache_total')}{RATE}))",
                    "{{result}}",
                ),
                (
                    f"sum(rate({_m('hybrid_serve_answer_cache_saved_usd_total')}{RATE})) * 3600",
                    "saved USD / h",
                ),
                (f"max({_m('hybrid_serve_answer_cache_entries')})", "entries"),
            ],
            12,
            56,
        ),
        _panel(
            "Requests refused / s by API key (over requests_per_minute)",
            [
                (
                    f"sum by (key) (rate({_m('hybrid_serve_key_rate_limited_total')}{RATE}))",
                    "{{key}}",
                )
            ],
            0,
            64,
            "reqps",
        ),
        _panel(
            "Kept-answer error rate (shadow-verified by Claude, last day, 95 % interval)",
            _kept_error_rate(),
            12,
            64,
            "percentunit",
            description="Answers kept on the SLM that Claude graded below "
            "escalation.verify_min_score, of those it graded in the background "
            "(escalation.shadow_verify_share). Re-fit the threshold from the verdicts with "
            "`hybrid-serve calibrate --from-log DATA_DIR/shadow`.",
        ),
        _panel(
            "Refused at once / s by reason and priority (could not finish inside the deadline)",
            [
                (
                    f"sum by (reason, priority) (rate({_m('hybrid_serve_refusals_total')}{RATE}))",
                    "{{reason}} {{priority}}",
                )
            ],
            0,
            72,
            "reqps",
        ),
        _panel(
            "SLM: expected wait for a slot vs the deadline left on arrival",
            [
                *[
                    (e, f"wait {legend}")
                    for e, legend in _quantiles("hybrid_serve_slm_expected_wait_seconds")
                ],
                *[
                    (e, f"deadline left {legend}")
                    for e, legend in _quantiles("hybrid_serve_slm_deadline_seconds")[:1]
                ],
            ],
            12,
            72,
            "s",
            description="When the expected wait nears the deadline left, generations are "
            "refused (503 with Retry-After) instead of timing out.",
        ),
    ]
    for i, panel in enumerate(panels, start=1):
        panel["id"] = i
    return {
        "uid": DASHBOARD_UID,
        "title": "hybrid-serve",
        "tags": ["hybrid-serve", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                }
            ]
        },
        "panels": panels,
    }


def render_monitoring(cfg: HybridServeConfig) -> dict[str, Any]:
    """File name -> content: manifests (dicts) and the dashboard JSON (a string)."""
    k = for_kubernetes(cfg).k8s
    dashboard = json.dumps(render_dashboard(), indent=2) + "\n"
    configmap: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        # The kube-prometheus-stack Grafana sidecar loads ConfigMaps with this label.
        "metadata": object_metadata(
            cfg, f"{k.name}-grafana-dashboard", "monitoring", {"grafana_dashboard": "1"}
        ),
        "data": {"hybrid-serve.json": dashboard},
    }
    files: dict[str, Any] = {
        "podmonitor.yaml": render_podmonitor(cfg),
        "grafana-dashboard-configmap.yaml": configmap,
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(files),
    }
    return {**files, "kustomization.yaml": kustomization, "grafana-dashboard.json": dashboard}
