"""Where a replica runs and what Ray gave it: reported by every deployment's `status`, so an
operator (and the placement tests) can see GPU ids and resources without the dashboard."""

from __future__ import annotations

import os
import socket
from typing import Any, cast

import ray
from ray import serve
from ray.serve import Deployment

from hybrid_serve.config import HybridServeConfig


def placement() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {
        "node": socket.gethostname(),
        "pid": os.getpid(),
        "resources": {k: round(v, 4) for k, v in ctx.get_assigned_resources().items()},
        "gpu_ids": list(ctx.get_accelerator_ids().get("GPU", [])),
        # how many replicas of this deployment run: a status is one replica's, and a reader
        # summing per-replica figures (the load report's cost check) must know it saw one of n
        "replicas": serve.get_replica_context().world_size,
    }


def cpu_actor_options(cfg: HybridServeConfig, num_cpus: float) -> dict[str, Any]:
    """CPU-only deployments: no GPU, and pinned to CPU nodes when the cluster marks them."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": 0}
    if cfg.placement.cpu_resources():
        options["resources"] = cfg.placement.cpu_resources()
    return options


def shared_service_options(cfg: HybridServeConfig, calls_per_request: int) -> dict[str, Any]:
    """Concurrency of a single-replica service every ingress replica calls (ClaudeProxy,
    AnswerCache, KeyLimits): room for every request the ingress replicas can hold at once.
    Serve's default (5) queued `/readyz`'s status call behind a few slow LLM calls, past the
    probe's timeout; the work itself is asyncio and light, so the bound only stops a runaway."""
    o = cfg.orchestrator
    ongoing = o.replicas * o.max_ongoing_requests * calls_per_request
    return {"max_ongoing_requests": ongoing, "max_queued_requests": ongoing}


def deployment(cls: Any) -> Deployment:
    """A class `@serve.deployment` decorated, as the Deployment it is (Ray types the decorator as
    returning the class)."""
    return cast(Deployment, cls)
