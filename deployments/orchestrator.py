"""The ingress as a Serve deployment: the FastAPI application (routers, middleware, the one
error mapping), `Orchestrator` over the other deployments' handles, and its builder, which binds
it what needs new replicas when it changes and passes everything else as `user_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from hybrid_serve import __version__
from hybrid_serve.agents import tracing
from hybrid_serve.agents.shadow import VerdictLog, shadow_log_path
from hybrid_serve.config import HTTPConfig, HybridServeConfig, deep_merge
from hybrid_serve.deployments import openapi, tunables
from hybrid_serve.deployments.errors import install_error_handlers
from hybrid_serve.deployments.handles import HandleBackend
from hybrid_serve.deployments.health import deployment_health
from hybrid_serve.deployments.ingress import Ingress, current, install
from hybrid_serve.deployments.middleware import (
    AdmissionMiddleware,
    APIKeyMiddleware,
    BodyLimitMiddleware,
    ControlHeadersMiddleware,
    KeyLimitMiddleware,
    RequestTelemetryMiddleware,
)
from hybrid_serve.deployments.placement import cpu_actor_options, deployment, placement
from hybrid_serve.deployments.routers import answer, chat, documents, operations
from hybrid_serve.deployments.versions import versioned


def create_app() -> FastAPI:
    """The FastAPI application: routers, middleware, error mapping, the OpenAPI document with
    the configured limits. Routers reach the `Ingress` as a dependency (`ingress.shared`)."""
    app = FastAPI(
        title="hybrid-serve",
        version=__version__,
        description="Retrieval-grounded answers from a small model, with Claude when it adds "
        "value.",
    )
    install_error_handlers(app)
    app.state.ingress = None
    for router in (answer.router, chat.router, documents.router, operations.router):
        app.include_router(router)

    def ingress() -> Ingress | None:
        return current(app.state)

    def http() -> HTTPConfig:
        ing = ingress()
        return ing.cfg.http if ing is not None else HTTPConfig()

    made: dict[str, Any] = {}

    def document() -> dict[str, Any]:
        """The document states the configured limits: made again when they change."""
        limits = http()
        if made.get("for") != limits:
            made.update({"for": limits, "document": openapi.document(app, limits)})
        return made["document"]

    app.openapi = document  # type: ignore[method-assign]
    app.add_middleware(
        AdmissionMiddleware,
        limit=lambda: http().max_concurrent_requests,
        retry_after_s=lambda: http().retry_after_s,
        interactive_reserve=lambda: http().interactive_reserve,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: http().max_body_bytes)
    app.add_middleware(ControlHeadersMiddleware, max_s=lambda: http().max_request_timeout_s)
    app.add_middleware(
        KeyLimitMiddleware,
        admit=lambda: ing.admit if (ing := ingress()) is not None and ing.keys else None,
    )
    app.add_middleware(APIKeyMiddleware, keys=lambda: http().keys())
    app.add_middleware(RequestTelemetryMiddleware)
    return app


app = create_app()


@serve.deployment(name="Orchestrator")
@serve.ingress(app)
class Orchestrator:
    """The ingress as a Serve deployment: `Ingress` over the other deployments' handles. Its
    tunables (keys, limits, escalation, policies, cache, prices) come as `user_config` and
    change in place (`reconfigure`), without new replicas."""

    def __init__(
        self,
        retriever: DeploymentHandle,
        slm: DeploymentHandle,
        llm: DeploymentHandle,
        cache: DeploymentHandle,
        key_limits: DeploymentHandle,
        config: dict[str, Any],
    ) -> None:
        cfg = HybridServeConfig.from_args(config)
        tracing.setup("Orchestrator", cfg.tracing)
        context = serve.get_replica_context()
        replica = context.replica_id.unique_id
        app_name = context.app_name
        self.ingress = Ingress(
            cfg,
            HandleBackend(retriever),
            HandleBackend(slm),
            HandleBackend(llm),
            HandleBackend(cache),
            HandleBackend(key_limits),
            verdicts=VerdictLog(shadow_log_path(Path(cfg.data_dir), replica)),
            health=lambda deployment: deployment_health(app_name, deployment),
        )
        install(self.ingress)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after the constructor and whenever the tunables change."""
        if not user_config["http"].get("api_keys"):  # on Kubernetes, a Secret in the environment
            keys = tunables.keys_from_environment()
            user_config = deep_merge(user_config, {"http": {"api_keys": keys}})
        in_force = self.ingress.cfg.to_args()
        self.ingress.reconfigure(HybridServeConfig.from_args(deep_merge(in_force, user_config)))

    async def status(self) -> dict[str, Any]:
        """For the deployment handle (not a route): where this replica runs."""
        return {"ready": True, "placement": placement()}


def ingress_fixed(cfg: HybridServeConfig) -> dict[str, Any]:
    """What the ingress binds: where its logs go and how it traces (new replicas on a change)."""
    return {
        "app_name": cfg.app_name,
        "data_dir": str(cfg.data_dir),
        "tracing": cfg.tracing.model_dump(mode="json"),
    }


def get_deployment_options(cfg: HybridServeConfig) -> dict[str, Any]:
    o = cfg.orchestrator
    return {
        "num_replicas": o.replicas,
        "max_ongoing_requests": o.max_ongoing_requests,
        "max_queued_requests": o.max_queued_requests,
        "ray_actor_options": cpu_actor_options(cfg, o.num_cpus),
        "user_config": tunables.orchestrator(cfg),
    }


def bind_args(cfg: HybridServeConfig) -> tuple[Any, ...]:
    return (ingress_fixed(cfg),)


def build_orchestrator(cfg: HybridServeConfig, *handles: Application) -> Application:
    """The ingress over the five deployments it calls (retriever, SLM, LLM proxy, answer cache,
    key limits), in that order."""
    options = get_deployment_options(cfg)
    return versioned(deployment(Orchestrator), options, *bind_args(cfg), handles=handles)
