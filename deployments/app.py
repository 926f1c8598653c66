"""The application builder: one configuration in, the whole Serve application out.

Used by `hybrid-serve up`, by `serve run deployments.app:build_app`, and by the Serve config that
`hybrid-serve k8s render` embeds in the RayService manifest.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.config import HybridServeConfig
from deployments.claude_proxy import ClaudeProxy
from deployments.orchestrator import Orchestrator
from deployments.retriever import RetrieverDeployment
from deployments.slm import SLMDeployment


def build(cfg: HybridServeConfig) -> Application:
    args = cfg.to_args()
    retriever = RetrieverDeployment.options(
        num_replicas=cfg.retriever.replicas,
        max_ongoing_requests=cfg.retriever.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.retriever.num_cpus},
    ).bind(args)
    slm = SLMDeployment.options(
        num_replicas=cfg.slm.replicas,
        # Above contexts_per_replica, requests wait inside the replica for a free context; the
        # margin keeps status calls and short queues from waiting behind a long generation.
        max_ongoing_requests=max(cfg.slm.max_ongoing_requests, cfg.slm.contexts_per_replica),
        max_queued_requests=cfg.slm.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.slm.num_cpus, "num_gpus": cfg.slm.num_gpus},
    ).bind(args)
    claude = ClaudeProxy.options(
        num_replicas=1, ray_actor_options={"num_cpus": cfg.claude.num_cpus}
    ).bind(args)
    return Orchestrator.options(
        num_replicas=cfg.orchestrator.replicas,
        max_ongoing_requests=cfg.orchestrator.max_ongoing_requests,
        max_queued_requests=cfg.orchestrator.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.orchestrator.num_cpus},
    ).bind(retriever, slm, claude, args)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application-builder entry point; `args` is the configuration as a mapping.

    Keys may be nested (`{"slm": {"replicas": 2}}`) or dotted (`{"slm.replicas": 2}`); what is
    not given comes from the environment and defaults, as for `hybrid-serve up`.
    """
    return build(HybridServeConfig.load(overrides=dict(args or {})))
