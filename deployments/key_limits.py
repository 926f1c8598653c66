"""KeyLimits: per-API-key request rates and daily Claude budgets as one Serve replica, so that a
key's limit holds over the cluster however many orchestrator replicas share its traffic."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray import serve

from hybrid_serve.agents.limits import KeyLimits as Limits
from hybrid_serve.agents.tracing import TraceContext
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.placement import placement


@serve.deployment(name="KeyLimits")
class KeyLimits:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = HybridServeConfig.from_args(config)
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        limits = {
            k.label(): (k.requests_per_minute, k.daily_claude_budget_usd) for k in cfg.http.keys()
        }
        self.limits = Limits(limits, Path(cfg.data_dir) / "key-ledger.json")

    async def admit(self, label: str, trace_context: TraceContext = None) -> dict[str, Any]:
        return asdict(self.limits.admit(label))

    async def record(
        self,
        label: str,
        claude_usd: float,
        slm_usd: float,
        saved_usd: float,
        cache_hit: bool,
        trace_context: TraceContext = None,
    ) -> None:
        self.limits.record(label, claude_usd, slm_usd, saved_usd, cache_hit)

    async def report(self, trace_context: TraceContext = None) -> dict[str, Any]:
        return self.limits.report()

    async def status(self, trace_context: TraceContext = None) -> dict[str, Any]:
        return {"ready": True, "keys": len(self.limits.limits), "placement": placement()}
