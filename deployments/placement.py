"""Where a replica runs and what Ray gave it: reported by every deployment's `status`, so an
operator (and the placement tests) can see GPU ids and resources without the dashboard."""

from __future__ import annotations

import os
import socket
from typing import Any, cast

import ray
from ray.serve import Deployment

from hybrid_serve.config import HybridServeConfig


def placement() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {
        "node": socket.gethostname(),
        "pid": os.getpid(),
        "resources": {k: round(v, 4) for k, v in ctx.get_assigned_resources().items()},
        "gpu_ids": list(ctx.get_accelerator_ids().get("GPU", [])),
    }


def cpu_actor_options(cfg: HybridServeConfig, num_cpus: float) -> dict[str, Any]:
    """CPU-only deployments: no GPU, and pinned to CPU nodes when the cluster marks them."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": 0}
    if cfg.placement.cpu_resources():
        options["resources"] = cfg.placement.cpu_resources()
    return options


def deployment(cls: Any) -> Deployment:
    """A class `@serve.deployment` decorated, as the Deployment it is (Ray types the decorator as
    returning the class)."""
    return cast(Deployment, cls)
