"""What operators and probes ask: `GET /healthz` (alive), `GET /readyz` (every deployment ready,
details for an admin key), `GET /v1/usage` (a key's own usage; the cluster's totals for an admin
key)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hybrid_serve import __version__
from hybrid_serve.deployments.ingress import Shared, access_of, bounded

router = APIRouter()


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: every deployment ready and the index loaded (details with an admin "
    "key, or when the API has no keys)",
)
async def readyz(request: Request, ing: Shared) -> JSONResponse:
    """A deployment is ready when one of its replicas answers: Serve routes only to replicas
    whose constructor finished, and an SLM replica's constructor ends with a generation. Every
    component also carries how many of its replicas crashed, so a replica that keeps dying shows
    as such rather than as starting. Those details (spend, budget, nodes, PIDs, crash messages)
    are for an admin key; anyone else, a Kubernetes probe included, learns ready or not, per
    deployment."""
    backends = ing.backends()
    results = await asyncio.gather(*(ing.component(n, b) for n, b in backends.items()))
    components = dict(zip(backends, results))
    ready = all(c.get("ready") for c in components.values())
    caller = access_of(ing.keys, request)
    body: dict[str, Any] = {"ready": ready, "version": __version__, "components": components}
    if caller is None or not caller.admin:
        body["components"] = {n: {"ready": bool(c.get("ready"))} for n, c in components.items()}
    else:  # what replica time is charged at, for comparing charges with busy time
        body["prices"] = {"slm_gpu_hour_usd": ing.cfg.cost.slm_gpu_hour_usd}
    return JSONResponse(
        body,
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )


@router.get(
    "/v1/usage",
    summary="Your key's usage; for an admin key, the cost ledger's totals (Claude spend, SLM "
    "cost, savings), the answer cache's, and every key's",
)
async def usage(request: Request, ing: Shared) -> dict[str, Any]:
    """An admin key (or anyone, when the API has no keys) sees the cluster's totals and every
    key's line; any other key its own line only."""
    timeout = ing.deadline(request)
    caller = ing.access(request)
    if not caller.admin:
        keys = await bounded(ing.key_limits.call("report", read=True), timeout)
        return {"keys": {caller.label(): keys.get(caller.label(), {})}}
    status, cache = await bounded(
        asyncio.gather(ing.llm.call("status", read=True), ing.cache.call("status", read=True)),
        timeout,
    )
    totals = status.get("totals", {})
    estimate = totals.get("all_claude_cost_usd_estimate", 0.0)
    spent = totals.get("cost_usd", 0.0) + totals.get("slm_cost_usd", 0.0)
    out: dict[str, Any] = {
        "totals": totals,
        "budget_remaining_usd": status.get("budget_remaining_usd"),
        "circuit": status.get("circuit"),
        "saving_ratio": round(estimate / spent, 3) if spent > 0 else None,
        "cache": {k: v for k, v in cache.items() if k not in ("ready", "placement")},
    }
    if ing.keys:
        out["keys"] = await bounded(ing.key_limits.call("report", read=True), timeout)
    return out
