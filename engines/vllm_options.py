"""How the configuration becomes `ray.serve.llm`'s LLMConfig for the `vllm` engine. Plain data, so
it is checked without vLLM installed."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hybrid_serve.config import HybridServeConfig, VLLMEngineConfig

Device = Literal["cuda", "cpu"]

# The config keys' own variables, read by the replicas of LLMServer (which gets no config).
WARMUP_TIMEOUT_ENV = "HYBRID_SERVE_SLM__WARMUP_TIMEOUT_S"
TIER_WARMUP_TIMEOUT_ENV = "HYBRID_SERVE_LLM__DEPLOY__WARMUP_TIMEOUT_S"
# Not config keys: how the KV cache was sized and why the model runs compiled or eagerly, for
# the replica's status.
KV_CACHE_NOTE_ENV = "HYBRID_SERVE_KV_CACHE_NOTE"
COMPILATION_NOTE_ENV = "HYBRID_SERVE_COMPILATION_NOTE"


def vllm_device(v: VLLMEngineConfig, cluster_gpus: float | None = None) -> Device:
    """Where the vLLM workers run. `auto` follows the cluster's GPUs; with no cluster to look at
    (rendering manifests) it plans for GPUs, which is what a KubeRay GPU profile provides."""
    if v.device != "auto":
        return v.device
    return "cuda" if cluster_gpus is None or cluster_gpus > 0 else "cpu"


# On CPUs the KV cache may take at most this share of the memory free when the application is
# built: the rest of the node (Ray, the retriever, other replicas) needs the remainder.
CPU_KV_SHARE_OF_FREE = 0.25
# vLLM's CPU attention pages the KV cache in blocks of up to 128 tokens; one spare block a
# sequence keeps a full-length one from falling a page short.
KV_BLOCK_TOKENS = 128
GiB = 1 << 30


def kv_bytes_per_token(model_dir: str | Path, dtype: str | None = None) -> int | None:
    """K and V of every layer for one token, from the model's config.json (None when the
    directory has none, e.g. a Hugging Face repo id not downloaded yet). Two bytes a value
    (vLLM's bfloat16 on CPUs) unless the engine is told float32."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    except (KeyError, TypeError, ValueError):
        return None
    width = 4 if dtype in ("float32", "float") else 2
    return 2 * layers * kv_heads * head_dim * width


@dataclass(frozen=True)
class Compilation:
    """How replicas on CPUs run the model, and why (their status and `doctor` say); decided
    where the application is built (engines.vllm_compile)."""

    compiled: bool
    reason: str


def configured_compilation(v: VLLMEngineConfig) -> Compilation:
    """The mode `compile` names without a check: `auto` until the check has been made is eager,
    the mode known correct on every CPU."""
    if v.compile == "on":
        return Compilation(True, "compiled: as configured (compile: on)")
    if v.compile == "off":
        return Compilation(False, "eager: as configured (compile: off)")
    return Compilation(False, "eager: compile is auto and no check was made where this was built")


@dataclass(frozen=True)
class KVCachePlan:
    """The CPU KV cache a replica reserves, and how it was chosen (start-up and doctor say)."""

    bytes: int
    sequences: int  # full-length sequences it holds at once
    reason: str


def cpu_kv_cache(
    v: VLLMEngineConfig, model_dir: str | Path, free_bytes: int | None = None
) -> KVCachePlan | None:
    """An absolute KV-cache size for vLLM on CPUs. vLLM's own default is a share of the node's
    memory less what the worker process holds when it measures, so the same configuration
    starts on an idle machine and fails on one where other processes (an earlier test, another
    replica) hold memory. This sizes it from the model instead: `max_num_seqs` sequences of
    `max_model_len` tokens, capped at `CPU_KV_SHARE_OF_FREE` of the free memory but never below
    one full-length sequence; `kv_cache_gib` overrides. None when the model's shape is unknown
    (vLLM's share then applies)."""
    if v.kv_cache_gib is not None:
        size = int(v.kv_cache_gib * GiB)
        return KVCachePlan(size, 0, f"{v.kv_cache_gib:g} GiB as configured (kv_cache_gib)")
    per_token = kv_bytes_per_token(model_dir, v.engine_kwargs.get("dtype"))
    if per_token is None:
        return None
    per_seq = per_token * (math.ceil(v.max_model_len / KV_BLOCK_TOKENS) + 1) * KV_BLOCK_TOKENS
    if free_bytes is None:
        import psutil

        free_bytes = psutil.virtual_memory().available
    fit = int(free_bytes * CPU_KV_SHARE_OF_FREE) // per_seq
    sequences = max(1, min(v.max_num_seqs, fit))
    size = sequences * per_seq
    why = (
        f"{size / GiB:.2f} GiB: {sequences} sequence(s) of {v.max_model_len} tokens at "
        f"{per_token / 1024:.1f} KiB a token"
    )
    if sequences < v.max_num_seqs:
        why += (
            f" (max_num_seqs {v.max_num_seqs} would need {v.max_num_seqs * per_seq / GiB:.2f} "
            f"GiB; {CPU_KV_SHARE_OF_FREE:.0%} of the {free_bytes / GiB:.1f} GiB free is the cap)"
        )
    return KVCachePlan(size, sequences, why)


def device_engine_kwargs(
    v: VLLMEngineConfig,
    device: Device,
    model_dir: str | Path | None = None,
    compilation: Compilation | None = None,
) -> tuple[dict[str, Any], str | None]:
    """What differs between vLLM on GPUs and its CPU build. On CPUs the KV cache has an
    absolute size (`cpu_kv_cache`), and the model runs compiled only where `compilation` says
    (by default as `compile` is configured: engines.vllm_compile checks it on the machine).
    Returns the engine arguments and, on CPUs, what the KV cache was sized to and why."""
    share = v.gpu_memory_utilization
    if device == "cuda":
        return {"gpu_memory_utilization": share or 0.90}, None
    eager = not (compilation or configured_compilation(v)).compiled
    plan = cpu_kv_cache(v, model_dir) if model_dir is not None else None
    if plan is None:
        share = share or 0.20
        note = f"{share:.0%} of the node's memory less the worker's own (model shape unknown)"
        return {"gpu_memory_utilization": share, "enforce_eager": eager}, note
    out: dict[str, Any] = {"kv_cache_memory_bytes": plan.bytes, "enforce_eager": eager}
    if share is not None:
        out["gpu_memory_utilization"] = share
    return out, plan.reason


def kv_cache_note(llm_config: dict[str, Any]) -> str | None:
    """What the KV cache of a replica built from these LLMConfig arguments was sized to (CPUs)."""
    return llm_config["runtime_env"]["env_vars"].get(KV_CACHE_NOTE_ENV)


def compilation_note(llm_config: dict[str, Any]) -> str | None:
    """Whether a replica built from these LLMConfig arguments runs compiled, and why (CPUs)."""
    return llm_config["runtime_env"]["env_vars"].get(COMPILATION_NOTE_ENV)


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
    compilation: Compilation | None = None,
) -> dict[str, Any]:
    compilation = compilation or configured_compilation(v)
    device_kwargs, kv_note = device_engine_kwargs(v, device, model_source, compilation)
    if kv_note:  # the replica reports these in its status
        env = {**env, KV_CACHE_NOTE_ENV: kv_note}
    if device == "cpu":
        env = {**env, COMPILATION_NOTE_ENV: compilation.reason}
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": model_source},
        "engine_kwargs": {
            "tensor_parallel_size": v.tensor_parallel_size,
            "max_model_len": v.max_model_len,
            "max_num_seqs": v.max_num_seqs,
            **device_kwargs,
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
    cfg: HybridServeConfig,
    device: Device = "cuda",
    model_source: str | None = None,
    compilation: Compilation | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `ray.serve.llm.LLMConfig` for the SLM; `model_source`: where the
    weights are once prepared (see engines.vllm_model), by default the configured source;
    `compilation`: the check's verdict on CPUs (engines.vllm_compile), else as configured."""
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
        compilation=compilation,
    )


# Names the variable holding the tier's key (`llm.api_key_env`), for the replica to read.
TIER_KEY_ENV_ENV = "HYBRID_SERVE_LLM_TIER_KEY_ENV"


def tier_llm_config_kwargs(
    cfg: HybridServeConfig,
    device: Device = "cuda",
    model_source: str | None = None,
    compilation: Compilation | None = None,
) -> dict[str, Any]:
    """`ray.serve.llm.LLMConfig` keyword arguments of the cluster's own LLM tier. Only the name
    of its key's variable is passed: the replica reads the key from its own environment (a
    Secret), so it is never part of a config."""
    tier = cfg.llm.deploy
    env = {
        **cfg.tracing.env(),
        TIER_KEY_ENV_ENV: cfg.llm.api_key_env,
        TIER_WARMUP_TIMEOUT_ENV: str(tier.warmup_timeout_s),
    }
    return _llm_config(
        tier,
        cfg.llm.model,
        model_source or tier.model_source,
        device,
        {"num_replicas": tier.replicas, "max_ongoing_requests": tier.max_ongoing_requests},
        tier.num_cpus,
        env,
        {cfg.placement.llm_node_resource: 1} if cfg.placement.llm_node_resource else None,
        # vLLM parses tool calls only with auto tool choice on; forced calls need the parser.
        {"tool_call_parser": tier.tool_call_parser, "enable_auto_tool_choice": True},
        compilation,
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
    """GPUs the cluster's own LLM tier holds (llm.deploy), all replicas."""
    tier = cfg.llm.deploy
    if not tier.enabled or vllm_device(tier) != "cuda":
        return 0.0
    return float(tier.replicas * tier.tensor_parallel_size)
