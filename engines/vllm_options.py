"""How the configuration becomes `ray.serve.llm`'s LLMConfig for the `vllm` engine. Plain data, so
it is checked without vLLM (which only GPU images install)."""

from __future__ import annotations

from typing import Any

from cluster.config import HybridServeConfig


WARMUP_TIMEOUT_ENV = "HYBRID_SERVE_SLM__WARMUP_TIMEOUT_S"  # the config key's own variable


def llm_config_kwargs(cfg: HybridServeConfig) -> dict[str, Any]:
    """Keyword arguments of `ray.serve.llm.LLMConfig`."""
    slm, v = cfg.slm, cfg.slm.vllm
    deployment: dict[str, Any] = {
        "max_ongoing_requests": slm.max_ongoing_requests,
        "max_queued_requests": slm.max_queued_requests,
        # The replica actor itself needs no GPU: vLLM's workers take theirs from the bundles.
        "ray_actor_options": {"num_cpus": slm.num_cpus},
    }
    if slm.autoscaling is not None:
        deployment["autoscaling_config"] = slm.autoscaling.serve_options()
    else:
        deployment["num_replicas"] = slm.replicas
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": slm.model_name, "model_source": v.model_source},
        "engine_kwargs": {
            "tensor_parallel_size": v.tensor_parallel_size,
            "max_model_len": v.max_model_len,
            "gpu_memory_utilization": v.gpu_memory_utilization,
            "max_num_seqs": v.max_num_seqs,
            **v.engine_kwargs,
        },
        "deployment_config": deployment,
        # One bundle per tensor-parallel worker, each with its GPU, kept together as configured.
        "placement_group_config": {
            "bundles": [{"GPU": 1, "CPU": 1} for _ in range(v.tensor_parallel_size)],
            "strategy": v.placement_strategy,
        },
    }
    if v.accelerator_type:
        kwargs["accelerator_type"] = v.accelerator_type
    # LLMServer gets no hybrid-serve config: tracing and the warm-up's bound go by environment.
    kwargs["runtime_env"] = {
        "env_vars": {**cfg.tracing.env(), WARMUP_TIMEOUT_ENV: str(slm.warmup_timeout_s)}
    }
    return kwargs


def gpus_per_replica(cfg: HybridServeConfig) -> float:
    """GPUs one SLM replica holds, whatever the engine."""
    if cfg.slm.engine == "vllm":
        return float(cfg.slm.vllm.tensor_parallel_size)
    return cfg.slm.num_gpus
