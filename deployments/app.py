"""The application builder: one configuration in, the whole Serve application out.

Used by `hybrid-serve up`, by `serve run hybrid_serve.deployments.app:build_app`, and by the Serve
config that `hybrid-serve k8s render` embeds in the RayService manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.serve import Application

from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.answer_cache import AnswerCache
from hybrid_serve.deployments.claude_proxy import ClaudeProxy
from hybrid_serve.deployments.key_limits import KeyLimits
from hybrid_serve.deployments.orchestrator import Orchestrator
from hybrid_serve.deployments.retriever import RetrieverDeployment
from hybrid_serve.deployments.slm import SLMDeployment
from hybrid_serve.engines.vllm_model import require_vllm


def cpu_actor_options(cfg: HybridServeConfig, num_cpus: float) -> dict[str, Any]:
    """CPU-only deployments: no GPU, and pinned to CPU nodes when the cluster marks them."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": 0}
    if cfg.placement.cpu_resources():
        options["resources"] = cfg.placement.cpu_resources()
    return options


def slm_options(cfg: HybridServeConfig) -> dict[str, Any]:
    """Serve options of the SLM deployment for the in-process engines (llama_cpp, openai)."""
    slm = cfg.slm
    options: dict[str, Any] = {
        # Above contexts_per_replica, requests wait inside the replica for a free context; the
        # margin keeps status calls and short queues from waiting behind a long generation.
        "max_ongoing_requests": max(slm.max_ongoing_requests, slm.contexts_per_replica),
        "max_queued_requests": slm.max_queued_requests,
        "ray_actor_options": {"num_cpus": slm.num_cpus, "num_gpus": slm.num_gpus},
    }
    if slm.autoscaling is not None:
        options["autoscaling_config"] = slm.autoscaling.serve_options()
    else:
        options["num_replicas"] = slm.replicas
    if not slm.num_gpus and cfg.placement.cpu_resources():
        options["ray_actor_options"]["resources"] = cfg.placement.cpu_resources()
    if slm.num_gpus and cfg.placement.slm_node_resource:
        options["ray_actor_options"]["resources"] = {cfg.placement.slm_node_resource: slm.num_gpus}
    return options


def build(cfg: HybridServeConfig, progress: Callable[[str], None] | None = None) -> Application:
    """`progress`: one-line updates of slow preparation (converting the bundled model for vLLM)."""
    args = cfg.to_args()
    retriever = RetrieverDeployment.options(
        num_replicas=cfg.retriever.replicas,
        max_ongoing_requests=cfg.retriever.max_ongoing_requests,
        ray_actor_options=(
            {"num_cpus": cfg.retriever.num_cpus, "num_gpus": cfg.retriever.num_gpus}
            if cfg.retriever.num_gpus  # FAISS on a GPU node
            else cpu_actor_options(cfg, cfg.retriever.num_cpus)
        ),
    ).bind(args)
    if cfg.slm.engine == "vllm":
        require_vllm()  # before importing ray.serve.llm, which needs the vllm extras too
        from hybrid_serve.deployments.slm_vllm import build_vllm_slm

        slm = build_vllm_slm(cfg, progress)
    else:
        slm = SLMDeployment.options(**slm_options(cfg)).bind(args)
    claude = ClaudeProxy.options(
        num_replicas=1, ray_actor_options=cpu_actor_options(cfg, cfg.claude.num_cpus)
    ).bind(args)
    # One replica each: the cache and the key limits are state every orchestrator shares.
    cache = AnswerCache.options(
        num_replicas=1, ray_actor_options=cpu_actor_options(cfg, cfg.cache.num_cpus)
    ).bind(args)
    key_limits = KeyLimits.options(
        num_replicas=1, ray_actor_options=cpu_actor_options(cfg, cfg.cache.num_cpus)
    ).bind(args)
    return Orchestrator.options(
        num_replicas=cfg.orchestrator.replicas,
        max_ongoing_requests=cfg.orchestrator.max_ongoing_requests,
        max_queued_requests=cfg.orchestrator.max_queued_requests,
        ray_actor_options=cpu_actor_options(cfg, cfg.orchestrator.num_cpus),
    ).bind(retriever, slm, claude, cache, key_limits, args)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application-builder entry point; `args` is the configuration as a mapping.

    Keys may be nested (`{"slm": {"replicas": 2}}`) or dotted (`{"slm.replicas": 2}`); what is
    not given comes from the environment and defaults, as for `hybrid-serve up`.
    """
    return build(HybridServeConfig.load(overrides=dict(args or {})))
