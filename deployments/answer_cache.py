"""AnswerCache: the answer cache as one Serve replica, so that every orchestrator replica sees
the same entries. A Ray actor rather than Redis: nothing more to run beside the cluster, and an
entry is a few kilobytes (an answer and a 384-float vector), so one replica holds the configured
bound (10,000 entries, about 40 MB) easily. A restart empties it, which costs repeats only."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from ray import serve

from hybrid_serve.agents.answer_cache import AnswerCache as Cache
from hybrid_serve.agents.tracing import TraceContext
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.metrics import keep_gauges_fresh, metrics
from hybrid_serve.deployments.placement import placement


@serve.deployment(name="AnswerCache")
class AnswerCache:
    def __init__(self, config: dict[str, Any]) -> None:
        c = HybridServeConfig.from_args(config).cache
        self.cache = Cache(max_entries=c.max_entries, ttl_s=c.ttl_s, min_similarity=c.similarity)
        keep_gauges_fresh(self._gauges)

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
