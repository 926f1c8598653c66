"""KeyLimits: per-API-key request rates and daily Claude budgets as one Serve replica, so that a
key's limit holds over the cluster however many orchestrator replicas share its traffic."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from hybrid_serve.agents.limits import KeyLimits as Limits
from hybrid_serve.agents.tracing import TraceContext
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments import tunables
from hybrid_serve.deployments.placement import (
    cpu_actor_options,
    deployment,
    placement,
    shared_service_options,
)
from hybrid_serve.deployments.versions import versioned


@serve.deployment(name="KeyLimits")
class KeyLimits:
    """Binds where its ledger lives; the keys' labels and limits (never the keys) are tunables,
    taken in place (`reconfigure`)."""

    def __init__(self, data_dir: str) -> None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.limits = Limits({}, Path(data_dir) / "key-ledger.json")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # No keys in the configuration: on Kubernetes they are a Secret in the environment.
        keys = user_config["keys"] or tunables.key_limits(HybridServeConfig.load())["keys"]
        self.limits.reconfigure({k: (rpm, usd) for k, (rpm, usd) in keys.items()})

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


def get_deployment_options(cfg: HybridServeConfig) -> dict[str, Any]:
    return {
        "num_replicas": 1,  # one count per key for the whole cluster
        "ray_actor_options": cpu_actor_options(cfg, cfg.cache.num_cpus),
        **shared_service_options(cfg, calls_per_request=1),
        "user_config": tunables.key_limits(cfg),
    }


def bind_args(cfg: HybridServeConfig) -> tuple[Any, ...]:
    return (str(cfg.data_dir),)


def build_key_limits(cfg: HybridServeConfig) -> Application:
    return versioned(deployment(KeyLimits), get_deployment_options(cfg), *bind_args(cfg))
