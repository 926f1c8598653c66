"""Stable deployment versions, so that deploying again restarts only what changed.

Serve restarts a deployment's replicas when its version changes and, when only its
`user_config` changed, calls `reconfigure()` on the running ones instead. Its Python API gives
every `serve.run` a random version, though (and its config path hashes the whole application's
arguments), so a second deploy restarts every replica. Here a deployment's version is a digest of
what its replicas are made from — the arguments it binds, its options but `user_config`, this
package's version — set on the Deployment as Serve's own constructor takes it; `hybrid-serve
reload` and `serve.run` of a new configuration then restart only the deployments whose own
settings changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from ray.serve import Application, Deployment

from hybrid_serve import __version__


def fingerprint(*parts: Any) -> str:
    encoded = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def versioned(
    deployment: Deployment,
    options: dict[str, Any],
    *args: Any,
    handles: Sequence[Application] = (),
) -> Application:
    """`deployment` with `options`, bound to `handles` (the deployments it calls) and `args`, its
    version a digest of `options` but `user_config` and of `args`."""
    fixed = {k: v for k, v in options.items() if k != "user_config"}
    configured = deployment.options(**options)
    configured._version = fingerprint(configured.name, fixed, args)
    return configured.bind(*handles, *args)


def versioned_app(app: Application, *parts: Any) -> Application:
    """An application another library built (Ray Serve LLM's), its root deployment versioned by
    `parts` where Serve exposes it; left as built otherwise."""
    root = getattr(app, "_bound_deployment", None)
    if isinstance(root, Deployment):
        root._version = fingerprint(root.name, parts)
    return app
