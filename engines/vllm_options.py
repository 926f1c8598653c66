"""How the configuration becomes `ray.serve.llm`'s LLMConfig for the `vllm` engine. Plain data, so
it is checked without vLLM installed."""

from __future__ import annotations

from typing import Any, Literal

from hybrid_serve.config import HybridServeConfig

Device = Literal["cuda", "cpu"]

WARMUP_TIMEOUT_ENV = "HYBRID_SERVE_SLM__WARMUP_TIMEOUT_S"  # the config key's own variable


def vllm_device(cfg: HybridServeConfig, cluster_gpus: float | None = None) -> Device:
    """Where the vLLM workers run. `auto` follows the cluster's GPUs; with no cluster to look at
    (rendering manifests) it plans for GPUs, which is what a KubeRay GPU profile provides."""
    device = cfg.slm.vllm.device
    if device != "auto":
        return device
    return "cuda" if cluster_gpus is None or cluster_gpus > 0 else "cpu"


def device_engine_kwargs(cfg: HybridServeConfig, device: Device) -> dict[str, Any]:
    """What differs between vLLM on GPUs and its CPU build. On CPUs, memory utilization is a
    share of the node's RAM (vLLM's default of 0.92 leaves nothing for the rest of the cluster),
    and the model runs eagerly: torch.compile cost minutes at each start on 2 cores and, with
    bfloat16 on an AVX2-only CPU, produced wrong tokens where eager mode answered correctly."""
    share = cfg.slm.vllm.gpu_memory_utilization
    if device == "cuda":
        return {"gpu_memory_utilization": share or 0.90}
    return {"gpu_memory_utilization": share or 0.20, "enforce_eager": True}


def llm_config_kwargs(
    cfg: HybridServeConfig, device: Device = "cuda", model_source: str | None = None
) -> dict[str, Any]:
    """Keyword arguments of `ray.serve.llm.LLMConfig`; `model_source`: where the weights are
    once prepared (see engines.vllm_model), by default the configured source."""
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
        "model_loading_config": {
            "model_id": slm.model_name,
            "model_source": model_source or v.model_source,
        },
        "engine_kwargs": {
            "tensor_parallel_size": v.tensor_parallel_size,
            "max_model_len": v.max_model_len,
            "max_num_seqs": v.max_num_seqs,
            **device_engine_kwargs(cfg, device),
            **v.engine_kwargs,
        },
        "deployment_config": deployment,
        # One bundle per tensor-parallel worker, each with its GPU (or, on CPUs, the cores the
        # replica reserves), kept together as configured.
        "placement_group_config": {
            "bundles": [
                {"GPU": 1, "CPU": 1} if device == "cuda" else {"CPU": max(1.0, slm.num_cpus)}
                for _ in range(v.tensor_parallel_size)
            ],
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


def cpus_per_replica(cfg: HybridServeConfig, device: Device | None = None) -> float:
    """Logical CPUs one SLM replica holds. For vllm, Ray Serve LLM adds the replica actor's own
    CPUs to the first bundle of the engine's placement group, so both count."""
    if cfg.slm.engine != "vllm":
        return cfg.slm.num_cpus
    kwargs = llm_config_kwargs(cfg, device or vllm_device(cfg))
    bundles = kwargs["placement_group_config"]["bundles"]
    return cfg.slm.num_cpus + sum(b.get("CPU", 0.0) for b in bundles)


def gpus_per_replica(cfg: HybridServeConfig) -> float:
    """GPUs one SLM replica holds, whatever the engine."""
    if cfg.slm.engine == "vllm":
        return float(cfg.slm.vllm.tensor_parallel_size) if vllm_device(cfg) == "cuda" else 0.0
    return cfg.slm.num_gpus
