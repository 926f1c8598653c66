"""The application builder: one configuration in, the whole Serve application out, each
deployment bound only to its own section (`build_*` beside each deployment) and its tunables
passed as `user_config`, so a change to a tunable is applied in place by `reconfigure()` — the
replicas keep running — and only a change to what a deployment binds starts new ones.

Used by `hybrid-serve up` (and its reload on SIGHUP), by `serve run
hybrid_serve.deployments.app:build_app`, and by the Serve config that `hybrid-serve k8s render`
embeds in the RayService manifest (where a changed `serveConfigV2` is applied the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.serve import Application

from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments import (
    answer_cache,
    claude_proxy,
    key_limits,
    orchestrator,
    retriever,
    slm,
)
from hybrid_serve.deployments.answer_cache import build_answer_cache
from hybrid_serve.deployments.claude_proxy import build_claude_proxy
from hybrid_serve.deployments.key_limits import build_key_limits
from hybrid_serve.deployments.orchestrator import build_orchestrator
from hybrid_serve.deployments.retriever import build_retriever
from hybrid_serve.deployments.slm import build_slm
from hybrid_serve.engines.vllm_model import require_vllm
from hybrid_serve.engines.vllm_options import llm_config_kwargs, tier_llm_config_kwargs


def build(cfg: HybridServeConfig, progress: Callable[[str], None] | None = None) -> Application:
    """`progress`: one-line updates of slow preparation (converting the bundled model for vLLM)."""
    if cfg.slm.engine == "vllm":
        require_vllm()  # before importing ray.serve.llm, which needs the vllm extras too
        from hybrid_serve.deployments.slm_vllm import build_vllm_slm

        slm_app = build_vllm_slm(cfg, progress)
    else:
        slm_app = build_slm(cfg)
    return build_orchestrator(
        cfg,
        build_retriever(cfg),
        slm_app,
        build_claude_proxy(cfg),
        build_answer_cache(cfg),
        build_key_limits(cfg),
    )


def replica_defining(cfg: HybridServeConfig) -> dict[str, Any]:
    """What each deployment's replicas are made from — its bound arguments and its options but
    `user_config` — by deployment name: where this differs between two configurations, a
    change needs new replicas; anywhere else it is applied in place."""
    modules = {
        "Retriever": retriever,
        "ClaudeProxy": claude_proxy,
        "AnswerCache": answer_cache,
        "KeyLimits": key_limits,
        "Orchestrator": orchestrator,
    }
    out: dict[str, Any] = {}
    for name, module in modules.items():
        options = {
            k: v for k, v in module.get_deployment_options(cfg).items() if k != "user_config"
        }
        out[name] = (module.bind_args(cfg), options)
    if cfg.slm.engine == "vllm":
        out["SLM"] = llm_config_kwargs(cfg, model_source="(prepared)")
    else:
        out["SLM"] = (slm.bind_args(cfg), slm.get_deployment_options(cfg))
    if cfg.llm.deploy.enabled:
        out["LLM tier"] = tier_llm_config_kwargs(cfg, model_source="(prepared)")
    return out


def restarts(old: HybridServeConfig, new: HybridServeConfig) -> list[str]:
    """The deployments a change from `old` to `new` starts new replicas of."""
    before, after = replica_defining(old), replica_defining(new)
    return sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application-builder entry point; `args` is the configuration as a mapping.

    Keys may be nested (`{"slm": {"replicas": 2}}`) or dotted (`{"slm.replicas": 2}`); what is
    not given comes from the environment and defaults, as for `hybrid-serve up`.
    """
    return build(HybridServeConfig.load(overrides=dict(args or {})))
