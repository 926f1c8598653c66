"""ClaudeProxy: the one place that talks to Anthropic. Without a key it reports itself unavailable
and the cluster keeps answering from the SLM."""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from cluster.config import HybridServeConfig


@serve.deployment(name="ClaudeProxy")
class ClaudeProxy:
    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = HybridServeConfig.from_args(config).claude
        self.client = None
        self.reason: str | None = None
        if not os.environ.get("ANTHROPIC_API_KEY"):
            self.reason = "no_api_key"
            return
        from anthropic import AsyncAnthropic

        # Key and base URL come from ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL, read by the SDK.
        self.client = AsyncAnthropic(timeout=self.cfg.timeout_s, max_retries=self.cfg.max_retries)

    async def status(self) -> dict[str, Any]:
        return {
            "ready": True,
            "available": self.client is not None,
            "reason": self.reason,
            "model": self.cfg.model,
        }
