"""Where a replica runs and what Ray gave it: reported by every deployment's `status`, so an
operator (and the placement tests) can see GPU ids and resources without the dashboard."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray


def placement() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {
        "node": socket.gethostname(),
        "pid": os.getpid(),
        "resources": {k: round(v, 4) for k, v in ctx.get_assigned_resources().items()},
        "gpu_ids": list(ctx.get_accelerator_ids().get("GPU", [])),
    }
