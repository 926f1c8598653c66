"""How the configuration becomes `ray.serve.llm`'s LLMConfig for the `vllm` engine. Plain data, so
it is checked without vLLM installed."""

from __future__ import annotations

from typing import Any, Literal

from hybrid_serve.config import HybridServeConfig, VLLMEngineConfig

Device = Literal["cuda", "cpu"]

# The config keys' own variables, read by the replicas of LLMServer (which gets no config).
WARMUP_TIMEOUT_ENV = "HYBRID_SERVE_SLM__WARMUP_TIMEOUT_S"
TIER_WARMUP_TIMEOUT_ENV = "HYBRID_SERVE_CLAUDE__DEPLOY__WARMUP_TIMEOUT_S"


def vllm_device(v: VLLMEngineConfig, cluster_gpus: float | None = None) -> Device:
    """Where the vLLM workers run. `auto` follows the cluster's GPUs; with no cluster to look at
    (rendering manifests) it plans for GPUs, which is what a KubeRay GPU profile provides."""
    if v.device != "auto":
        return v.device
    return "cuda" if cluster_gpus is None or cluster_gpus > 0 else "cpu"


def device_engine_kwargs(v: VLLMEngineConfig, device: Device) -> dict[str, Any]:
    """What differs between vLLM on GPUs and its CPU build. On CPUs, memory utilization is a
    share of the node's RAM (vLLM's default of 0.92 leaves nothing for the rest of the cluster),
    and the model runs eagerly: torch.compile cost minutes at each start on 2 cores and, with
    bfloat16 on an AVX2-only CPU, produced wrong tokens where eager mode answered correctly."""
    share = v.gpu_memory_utilization
    if device == "cuda":
        return {"gpu_memory_utilization": share or 0.90}
    return {"gpu_memory_utilization": share or 0.20, "enforce_eager": True}


def _llm_config(
    v: VLLMEngineConfig,
    model_id: str,
    model_source: str,
    device: Device,
    deployment: dict[str, Any],
    num_cpus: float,
    env: dict[str, str],
    resources: dict[str, float] | None = None,
    frontend: dict[str, Any] | None = None,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": model_source},
        "engine_kwargs": {
            "tensor_parallel_size": v.tensor_parallel_size,
            "max_model_len": v.max_model_len,
            "max_num_seqs": v.max_num_seqs,
            **device_engine_kwargs(v, device),
            **(frontend or {}),
            **v.engine_kwargs,
        },
        # The replica actor itself needs no GPU: vLLM's workers take theirs from the bundles.
        "deployment_config": {**deployment, "ray_actor_options": {"num_cpus": num_cpus}},
        # One bundle per tensor-parallel worker, each with its GPU (or, on CPUs, the cores the
        # replica reserves), kept together as configured.
        "placement_group_config": {
            "bundles": [
                {"GPU": 1, "CPU": 1, **(resources or {})}
                if device == "cuda"
                else {"CPU": max(1.0, num_cpus)}
                for _ in range(v.tensor_parallel_size)
            ],
            "strategy": v.placement_strategy,
        },
        # LLMServer gets no hybrid-serve config: tracing and the warm-up's bound go by
        # environment.
        "runtime_env": {"env_vars": env},
    }
    if v.accelerator_type:
        kwargs["accelerator_type"] = v.accelerator_type
    return kwargs


def llm_config_kwargs(
    cfg: HybridServeConfig, device: Device = "cuda", model_source: str | None = None
) -> dict[str, Any]:
    """Keyword arguments of `ray.serve.llm.LLMConfig` for the SLM; `model_source`: where the
    weights are once prepared (see engines.vllm_model), by default the configured source."""
    slm = cfg.slm
    deployment: dict[str, Any] = {
        "max_ongoing_requests": slm.max_ongoing_requests,
        "max_queued_requests": slm.max_queued_requests,
    }
    if slm.autoscaling is not None:
        deployment["autoscaling_config"] = slm.autoscaling.serve_options()
    else:
        deployment["num_replicas"] = slm.replicas
    env = {**cfg.tracing.env(), WARMUP_TIMEOUT_ENV: str(slm.warmup_timeout_s)}
    pin = cfg.placement.slm_node_resource
    return _llm_config(
        slm.vllm,
        slm.model_name,
        model_source or slm.vllm.model_source,
        device,
        deployment,
        slm.num_cpus,
        env,
        {pin: 1} if pin else None,
    )


# Names the variable holding the tier's key (`claude.api_key_env`), for the replica to read.
TIER_KEY_ENV_ENV = "HYBRID_SERVE_LLM_TIER_KEY_ENV"


def tier_llm_config_kwargs(
    cfg: HybridServeConfig,
    device: Device = "cuda",
    model_source: str | None = None,
) -> dict[str, Any]:
    """`ray.serve.llm.LLMConfig` keyword arguments of the cluster's own LLM tier. Only the name
    of its key's variable is passed: the replica reads the key from its own environment (a
    Secret), so it is never part of a config."""
    tier = cfg.claude.deploy
    env = {
        **cfg.tracing.env(),
        TIER_KEY_ENV_ENV: cfg.claude.api_key_env,
        TIER_WARMUP_TIMEOUT_ENV: str(tier.warmup_timeout_s),
    }
    return _llm_config(
        tier,
        cfg.claude.model,
        model_source or tier.model_source,
        device,
        {"num_replicas": tier.replicas, "max_ongoing_requests": tier.max_ongoing_requests},
        tier.num_cpus,
        env,
        {cfg.placement.llm_node_resource: 1} if cfg.placement.llm_node_resource else None,
        # vLLM parses tool calls only with auto tool choice on; forced calls need the parser.
        {"tool_call_parser": tier.tool_call_parser, "enable_auto_tool_choice": True},
    )


def cpus_per_replica(cfg: HybridServeConfig, device: Device | None = None) -> float:
    """Logical CPUs one SLM replica holds. For vllm, Ray Serve LLM adds the replica actor's own
    CPUs to the first bundle of the engine's placement group, so both count."""
    if cfg.slm.engine != "vllm":
        return cfg.slm.num_cpus
    kwargs = llm_config_kwargs(cfg, device or vllm_device(cfg.slm.vllm))
    bundles = kwargs["placement_group_config"]["bundles"]
    return cfg.slm.num_cpus + sum(b.get("CPU", 0.0) for b in bundles)


def gpus_per_replica(cfg: HybridServeConfig) -> float:
    """GPUs one SLM replica holds, whatever the engine."""
    if cfg.slm.engine == "vllm":
        return (
            float(cfg.slm.vllm.tensor_parallel_size) if vllm_device(cfg.slm.vllm) == "cuda" else 0.0
        )
    return cfg.slm.num_gpus


def tier_gpus(cfg: HybridServeConfig) -> float:
    """GPUs the cluster's own LLM tier holds (claude.deploy), all replicas."""
    tier = cfg.claude.deploy
    if not tier.enabled or vllm_device(tier) != "cuda":
        return 0.0
    return float(tier.replicas * tier.tensor_parallel_size)
