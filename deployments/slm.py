"""SLM deployment: one engine per replica; the same interface whatever the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from agents.schemas import GenerationRequest, GenerationResult
from cluster.config import HybridServeConfig
from deployments.placement import placement
from engines import make_engine


@serve.deployment(name="SLM")
class SLMDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = HybridServeConfig.from_args(config)
        self.engine = make_engine(cfg.slm, replicas_on_node=cfg.slm.replicas)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.engine.generate(request)

    async def generate_stream(
        self, request: GenerationRequest
    ) -> AsyncIterator[str | GenerationResult]:
        """Text deltas, then the GenerationResult (call with `handle.options(stream=True)`)."""
        async for item in self.engine.stream(request):
            yield item

    async def status(self) -> dict[str, Any]:
        return {
            "ready": True,
            "engine": type(self.engine).__name__,
            "placement": placement(),
            "model": self.engine.model_name,
            "contexts": self.engine.contexts,
            "in_flight": self.engine.in_flight,
            "threads": self.engine.n_threads,
        }
