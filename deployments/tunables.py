"""What each deployment takes in place — its `user_config` — from the configuration, by
deployment name: the builders pass it as an option, and the KubeRay manifest renders it into
`serveConfigV2`'s `deployments` section (where Serve applies a change to it without new
replicas). Plain configuration, so rendering a manifest imports no engine.

API keys travel as digests, never as keys. Where the configuration has none (on Kubernetes they
are a Secret, not configuration), the ingress and KeyLimits read them from their replica's
environment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybrid_serve.config import HybridServeConfig


def retriever(cfg: HybridServeConfig) -> dict[str, Any]:
    return cfg.retriever.tunables()


def claude_proxy(cfg: HybridServeConfig) -> dict[str, Any]:
    return {"llm": cfg.llm.tunables(), "policies": cfg.policies.model_dump(mode="json")}


def answer_cache(cfg: HybridServeConfig) -> dict[str, Any]:
    return cfg.cache.tunables()


def key_limits(cfg: HybridServeConfig) -> dict[str, Any]:
    """Each key's label and limits: what KeyLimits counts by (the keys stay with the ingress)."""
    return {
        "keys": {
            k.label(): [k.requests_per_minute, k.daily_claude_budget_usd] for k in cfg.http.keys()
        }
    }


def orchestrator(cfg: HybridServeConfig) -> dict[str, Any]:
    """Everything the ingress reads per request."""
    http = cfg.http.tunables()
    http["api_keys"] = [
        k.model_copy(update={"key": "sha256:" + k.digest().hex(), "name": k.label()}).model_dump(
            mode="json"
        )
        for k in cfg.http.keys()
    ]
    return {
        "http": http,
        "escalation": cfg.escalation.tunables(),
        "policies": cfg.policies.tunables(),
        "conversation": cfg.conversation.tunables(),
        "cache": cfg.cache.tunables(),
        "cost": cfg.cost.tunables(),
        "llm": cfg.llm.model_dump(mode="json"),  # prices and the tier's name, for estimates
        "slm": cfg.slm.tunables(),
    }


BY_DEPLOYMENT: dict[str, Callable[[HybridServeConfig], dict[str, Any]]] = {
    "Retriever": retriever,
    "ClaudeProxy": claude_proxy,
    "AnswerCache": answer_cache,
    "KeyLimits": key_limits,
    "Orchestrator": orchestrator,
}


def without_tunables(args: dict[str, Any]) -> dict[str, Any]:
    """A configuration's arguments (`to_args`) with every tunable field left out: what an
    application binds, so that a tunable's change leaves Serve's code version alone."""
    cfg = HybridServeConfig.model_validate(args)
    out = dict(args)
    for name in cfg.model_fields:
        section = getattr(cfg, name)
        tunable = getattr(section, "TUNABLE", None)
        if tunable and isinstance(out.get(name), dict):
            out[name] = {k: v for k, v in out[name].items() if k not in tunable}
    return out


def keys_from_environment() -> list[dict[str, Any]]:
    """The API keys a replica's environment holds (a Secret), as the ingress takes them."""
    cfg = HybridServeConfig.load()
    return orchestrator(cfg)["http"]["api_keys"]
