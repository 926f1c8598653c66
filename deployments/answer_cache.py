"""AnswerCache: the answer cache as one Serve replica, so that every orchestrator replica sees
the same entries. A Ray actor rather than Redis: nothing more to run beside the cluster, and an
entry is a few kilobytes (an answer and a 384-float vector), so one replica holds the configured
bound (10,000 entries, about 40 MB) easily. A restart empties it, which costs repeats only."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application

from hybrid_serve.agents.semantic_cache import SemanticCache
from hybrid_serve.agents.tracing import TraceContext
from hybrid_serve.config import CacheConfig, HybridServeConfig
from hybrid_serve.deployments import tunables
from hybrid_serve.deployments.metrics import keep_gauges_fresh, metrics
from hybrid_serve.deployments.placement import (
    cpu_actor_options,
    deployment,
    placement,
    shared_service_options,
)
from hybrid_serve.deployments.versions import versioned


@serve.deployment(name="AnswerCache")
class AnswerCache:
    """No init arguments: its bounds are tunables (`reconfigure`); a restart empties it."""

    def __init__(self) -> None:
        c = CacheConfig()
        self.cache = SemanticCache(c.max_entries, c.ttl_s, c.similarity)
        keep_gauges_fresh(self._gauges)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        c = CacheConfig.model_validate(user_config)
        self.cache.reconfigure(c.max_entries, c.ttl_s, c.similarity)

    def _gauges(self) -> None:
        metrics.set("hybrid_serve_answer_cache_entries", len(self.cache))

    async def lookup(
        self,
        key: str,
        text: str,
        vector: list[float],
        index_version: int,
        trace_context: TraceContext = None,
    ) -> tuple[dict[str, Any], float, str, str] | None:
        return self.cache.lookup(key, text, np.asarray(vector, np.float32), index_version)

    async def store(
        self,
        key: str,
        text: str,
        vector: list[float],
        answer: dict[str, Any],
        index_version: int,
        saved_usd: float,
        owner: str = "",
        trace_context: TraceContext = None,
    ) -> bool:
        stored = self.cache.store(
            key, text, np.asarray(vector, np.float32), answer, index_version, saved_usd, owner
        )
        self._gauges()
        return stored

    async def status(self, trace_context: TraceContext = None) -> dict[str, Any]:
        return {
            "ready": True,
            "entries": len(self.cache),
            **asdict(self.cache.stats),
            "placement": placement(),
        }


def get_deployment_options(cfg: HybridServeConfig) -> dict[str, Any]:
    return {
        "num_replicas": 1,  # one set of entries for every ingress replica
        "ray_actor_options": cpu_actor_options(cfg, cfg.cache.num_cpus),
        **shared_service_options(cfg, calls_per_request=1),
        "user_config": tunables.answer_cache(cfg),
    }


def bind_args(cfg: HybridServeConfig) -> tuple[Any, ...]:
    return ()


def build_answer_cache(cfg: HybridServeConfig) -> Application:
    return versioned(deployment(AnswerCache), get_deployment_options(cfg), *bind_args(cfg))
