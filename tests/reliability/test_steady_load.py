"""Load held: a steady open-loop run (Poisson arrivals, the load harness's own code) at a rate the
local cluster sustains, with its error count, and each replica's memory at its start and end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hybrid_serve.benchmarks.load import RunSpec, run_load, summarize
from tests.reliability.conftest import replicas
from tests.reliability.steady import QUERIES

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

DEPLOYMENTS = ("Orchestrator", "Retriever", "SLM", "ClaudeProxy")
MB = 1024 * 1024


def _rss() -> dict[str, int]:
    return {
        f"{d}/{r.actor_name.rsplit('#', 1)[1]}": r.rss_bytes()
        for d in DEPLOYMENTS
        for r in replicas(d)
    }


def test_steady_load_without_errors_or_memory_growth(rel, tmp_path):
    bodies = [{"query": q, "mode": "slm", "verify": "never"} for q in QUERIES]
    warm = RunSpec(url=rel.url, duration=10, rate=5, warmup=0, api_key=rel.key, seed=1)
    asyncio.run(run_load(warm, bodies))  # every replica warm before the first reading
    start = _rss()
    spec = RunSpec(
        url=rel.url, duration=rel.scaled(45, 1800), rate=5, warmup=2, api_key=rel.key, seed=2
    )
    results = asyncio.run(run_load(spec, bodies))
    end = _rss()
    summary = summarize(results, spec, slo_p95_ms=2000, max_error_rate=0.0)
    memory = {
        name: {"start_mb": round(start[name] / MB, 1), "end_mb": round(end[name] / MB, 1)}
        for name in start
        if name in end
    }
    out = Path("bench-out/reliability") if rel.long else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    report = {"duration_s": spec.duration, "rate_rps": spec.rate, "summary": summary, "rss": memory}
    (out / "steady-load.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"requests": len(results), "errors": summary.get("errors"), "rss": memory}))

    assert len(results) >= spec.rate * spec.duration * 0.7
    assert all(r.ok for r in results), [r.status for r in results if not r.ok][:5]
    assert len(memory) == len(start) == 6  # every replica read at both ends
    for name, m in memory.items():
        grown = m["end_mb"] - m["start_mb"]
        assert grown <= max(64, 0.2 * m["start_mb"]), (name, m)
