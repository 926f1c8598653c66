"""ClaudeProxy: the one place that talks to the LLM tier (Anthropic's API, or any server of the
Messages API such as the cluster's own vLLM tier), so that the ledger, the budget, the rate limits
and the circuit breaker stay exact however many orchestrator replicas there are. Without a key
for Anthropic's API it reports itself unavailable and the cluster keeps answering from the SLM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from opentelemetry.trace import SpanKind
from ray import serve
from ray.serve import Application

from hybrid_serve.agents import tracing
from hybrid_serve.agents.interfaces import LLMCall, LLMResult, Role, Unavailable
from hybrid_serve.agents.llm_gateway import LLMGateway, tier_client
from hybrid_serve.agents.tracing import TraceContext
from hybrid_serve.config import HybridServeConfig, LLMConfig, PolicyConfig, TracingConfig
from hybrid_serve.deployments import tunables
from hybrid_serve.deployments.metrics import CIRCUIT_STATES, keep_gauges_fresh, metrics
from hybrid_serve.deployments.placement import (
    cpu_actor_options,
    deployment,
    placement,
    shared_service_options,
)
from hybrid_serve.deployments.versions import versioned

TIER_PROBE_TIMEOUT_S = 0.5


@serve.deployment(name="ClaudeProxy")
class ClaudeProxy:
    """Binds its own section: how to reach the tier (model, base URL, key variable); its limits,
    budgets, prices and the privacy policies are tunables, taken in place (`reconfigure`)."""

    def __init__(
        self, llm: dict[str, Any], base_url: str | None, data_dir: str, trace: dict[str, Any]
    ) -> None:
        tracing.setup("ClaudeProxy", TracingConfig.model_validate(trace))
        cfg = LLMConfig.model_validate(llm)
        self.base_url = base_url
        # The cluster serves the tier itself (llm.deploy, no base_url of its own).
        self.own_tier = cfg.deploy.enabled and not cfg.base_url
        client, reason = tier_client(self.base_url, os.environ.get(cfg.api_key_env))
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.gateway = LLMGateway(
            cfg,
            PolicyConfig(),
            client,
            ledger_path=Path(data_dir) / "claude-ledger.json",
            unavailable_reason=reason,
        )
        # What the metrics have counted so far: they follow the gateway's totals by difference,
        # so failed calls (retried, then given up) are counted too.
        self._counted = {"retries": 0, **self._totals()}
        keep_gauges_fresh(self._gauges)  # an open circuit half-opens with time alone

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after the constructor and whenever the tunables change."""
        g = self.gateway
        cfg = LLMConfig.model_validate({**g.cfg.model_dump(), **user_config["llm"]})
        g.reconfigure(cfg, PolicyConfig.model_validate(user_config["policies"]))

    def _totals(self) -> dict[str, float]:
        t = self.gateway.ledger.totals
        return {
            "input": t.input_tokens,
            "output": t.output_tokens,
            "cache_read": t.cache_read_tokens,
            "cache_write": t.cache_write_tokens,
            "cost_usd": t.cost_usd,
        }

    def _sync_metrics(self) -> None:
        now = {"retries": self.gateway.retries, **self._totals()}
        delta = {k: now[k] - self._counted[k] for k in now}
        self._counted = now
        for kind in ("input", "output", "cache_read", "cache_write"):
            metrics.inc("hybrid_serve_claude_tokens_total", delta[kind], kind=kind)
        metrics.inc("hybrid_serve_claude_cost_usd_total", delta["cost_usd"])
        metrics.inc("hybrid_serve_claude_retries_total", delta["retries"])
        self._gauges()

    def _gauges(self) -> None:
        metrics.set("hybrid_serve_claude_circuit_state", CIRCUIT_STATES[self.gateway.breaker.state])
        metrics.set(
            "hybrid_serve_claude_budget_remaining_usd", self.gateway.ledger.peek_remaining()
        )

    async def call(
        self, role: Role, request: LLMCall, trace_context: TraceContext = None
    ) -> LLMResult:
        """One role's call under its span (GenAI conventions), with its metrics."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self.provider,
            "gen_ai.request.model": self.gateway.cfg.model,
            "hybrid.claude.role": role,
            "hybrid.llm.tier": self.gateway.cfg.tier,
        }
        if self.base_url:
            url = urlsplit(self.base_url)
            attributes.update({"server.address": url.hostname, "server.port": url.port})
        outcome = "ok"
        with tracing.span(f"ClaudeProxy.{role}", trace_context, SpanKind.CLIENT, attributes):
            try:
                result = await self.gateway.call(role, request)
            except Unavailable as exc:
                outcome = exc.reason
                tracing.annotate({"hybrid.degraded": exc.reason})
                raise
            finally:
                metrics.inc("hybrid_serve_claude_calls_total", role=role, outcome=outcome)
                self._sync_metrics()
            u = result.usage
            score = getattr(result.output, "score", None) if role == "verify" else None
            tracing.annotate(
                {
                    "gen_ai.response.model": result.model,
                    "gen_ai.usage.input_tokens": u.input_tokens,
                    "gen_ai.usage.output_tokens": u.output_tokens,
                    "gen_ai.usage.cache_read.input_tokens": u.cache_read_tokens,
                    "gen_ai.usage.cache_creation.input_tokens": u.cache_write_tokens,
                    "hybrid.cost_usd": u.cost_usd,
                    "hybrid.claude.retries": max(0, u.attempts - 1),
                    "hybrid.pii_redacted": result.redacted,
                    "hybrid.verification.score": score,
                }
            )
            return result

    async def finish_request(
        self,
        request_id: str,
        slm_cost_usd: float,
        all_llm_estimate_usd: float,
        requests: int = 1,
        trace_context: TraceContext = None,
    ) -> None:
        await self.gateway.finish_request(request_id, slm_cost_usd, all_llm_estimate_usd, requests)

    @property
    def provider(self) -> str:
        """gen_ai.provider.name: Anthropic's API, the cluster's own vLLM, or another server."""
        if self.base_url is None:
            return "anthropic"
        return "vllm" if self.own_tier else "messages_api"

    async def status(self, trace_context: TraceContext = None) -> dict[str, Any]:
        self._sync_metrics()  # readiness probes keep the circuit and budget gauges fresh
        status = {**self.gateway.status(), "placement": placement()}
        if self.base_url is not None:
            status["base_url"] = self.base_url
        if self.own_tier:
            status["tier_ready"] = await self._tier_ready()
        return status

    async def _tier_ready(self) -> bool:
        """The cluster's own tier answers its health route (it loads long after the rest). A
        short probe, as readiness checks call it: until the tier has a replica, Serve's proxy
        holds the request rather than refusing it."""
        try:
            async with httpx.AsyncClient(timeout=TIER_PROBE_TIMEOUT_S) as http:
                return (await http.get(f"{self.base_url}/health")).status_code == 200
        except httpx.HTTPError:
            return False


def get_deployment_options(cfg: HybridServeConfig) -> dict[str, Any]:
    return {
        "num_replicas": 1,  # the one place the ledger and the limits are exact
        "ray_actor_options": cpu_actor_options(cfg, cfg.llm.num_cpus),
        **shared_service_options(cfg, calls_per_request=2),
        "user_config": tunables.claude_proxy(cfg),
    }


def bind_args(cfg: HybridServeConfig) -> tuple[Any, ...]:
    trace = cfg.tracing.model_dump(mode="json")
    return cfg.llm.fixed(), cfg.llm_base_url(), str(cfg.data_dir), trace


def build_claude_proxy(cfg: HybridServeConfig) -> Application:
    return versioned(deployment(ClaudeProxy), get_deployment_options(cfg), *bind_args(cfg))
