"""ClaudeProxy: the one place that talks to Anthropic, so that the ledger, the budget, the rate
limits and the circuit breaker stay exact however many orchestrator replicas there are. Without a
key it reports itself unavailable and the cluster keeps answering from the SLM."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import serve

from agents.claude import ClaudeGateway, ClaudeResult
from agents.schemas import Passage
from cluster.config import HybridServeConfig
from deployments.placement import placement


@serve.deployment(name="ClaudeProxy")
class ClaudeProxy:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = HybridServeConfig.from_args(config)
        client = None
        reason = None
        if os.environ.get("ANTHROPIC_API_KEY"):
            from anthropic import AsyncAnthropic

            # Key and base URL come from ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL, read by the SDK.
            # The gateway retries itself (honouring retry-after, feeding the circuit breaker).
            client = AsyncAnthropic(timeout=cfg.claude.timeout_s, max_retries=0)
        else:
            reason = "no_api_key"
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        self.gateway = ClaudeGateway(
            cfg.claude,
            cfg.policies,
            client,
            ledger_path=Path(cfg.data_dir) / "claude-ledger.json",
            unavailable_reason=reason,
        )

    async def rewrite(
        self, request_id: str, query: str, passages: Sequence[Passage], pii: str
    ) -> ClaudeResult:
        return await self.gateway.rewrite(request_id, query, passages, pii)  # type: ignore[arg-type]

    async def plan(
        self, request_id: str, query: str, passages: Sequence[Passage], pii: str
    ) -> ClaudeResult:
        return await self.gateway.plan(request_id, query, passages, pii)  # type: ignore[arg-type]

    async def verify(
        self, request_id: str, query: str, answer: str, passages: Sequence[Passage], pii: str
    ) -> ClaudeResult:
        return await self.gateway.verify(request_id, query, answer, passages, pii)  # type: ignore[arg-type]

    async def answer(
        self, request_id: str, query: str, passages: Sequence[Passage], pii: str, notes: str = ""
    ) -> ClaudeResult:
        return await self.gateway.answer(request_id, query, passages, pii, notes)  # type: ignore[arg-type]

    async def finish_request(
        self, request_id: str, slm_cost_usd: float, all_claude_estimate_usd: float
    ) -> None:
        self.gateway.finish_request(request_id, slm_cost_usd, all_claude_estimate_usd)

    async def status(self) -> dict[str, Any]:
        return {**self.gateway.status(), "placement": placement()}
