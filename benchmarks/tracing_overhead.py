"""Tracing overhead: `/v1/answer` latency with tracing on (OTLP/HTTP to a local receiver) against
off, in the same run and cluster.

    python -m hybrid_serve.benchmarks.tracing_overhead --requests 80 --out bench-out/tracing

Two copies of the application run side by side in one Ray cluster: `/off` with tracing off (the
default: no provider, no spans) and `/on` exporting every span over OTLP/HTTP to a receiver in
this process, which decodes them as a collector would. Requests alternate between the two in
random order, one at a time, so both see the same machine. The SLM is the `openai` engine against
a fixed-latency OpenAI-compatible server by default: a short, constant generation leaves the
framework's own work (where tracing adds its cost) as large a share of the latency as it gets.
`--engine llama_cpp` measures with the bundled model instead. Target: overhead <= 3 %.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hybrid_serve.benchmarks.fixed_latency_server import FixedLatencyServer
from hybrid_serve.benchmarks.otlp_receiver import OTLPReceiver
from hybrid_serve.benchmarks.report import (
    NO_CACHE,
    Progress,
    percentile,
    publish,
    start_private_ray,
)
from hybrid_serve.cluster.local import free_port

TARGET_PCT = 3.0
QUERIES = [
    "What port does the API use?",
    "How are documents split into chunks?",
    "When does the cluster call Claude?",
    "How is the index stored on disk?",
]


def deploy(name: str, engine: str, base_url: str | None, tracing: dict[str, Any]) -> None:
    from ray import serve

    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.deployments.app import build

    overrides: dict[str, Any] = {
        "app_name": name,
        "data_dir": tempfile.mkdtemp(prefix=f"hs-tracing-{name}-"),
        "slm.engine": engine,
        "slm.max_tokens": 32,
        "slm.num_cpus": 1 if engine == "llama_cpp" else 0.1,
        **{f"tracing.{k}": v for k, v in tracing.items()},
    }
    if base_url:
        overrides["slm.openai.base_url"] = base_url
        overrides["slm.model_name"] = "slm"
    cfg = HybridServeConfig.load(overrides=overrides)
    serve.run(build(cfg), name=name, route_prefix=f"/{name}", blocking=False)


def wait_ready(client: httpx.Client, prefix: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get(f"{prefix}/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{prefix} not ready after {timeout_s:.0f} s")


def one(client: httpx.Client, prefix: str, query: str) -> tuple[float, str]:
    start = time.perf_counter()
    r = client.post(f"{prefix}/v1/answer", json={"query": query, "mode": "slm", "verify": "never"})
    elapsed = (time.perf_counter() - start) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{prefix}: HTTP {r.status_code}: {r.text[:200]}")
    return elapsed, r.json()["trace_id"]


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean_ms": round(statistics.fmean(values), 2),
        "p50_ms": round(percentile(values, 50), 2),
        "p90_ms": round(percentile(values, 90), 2),
        "p99_ms": round(percentile(values, 99), 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=80, help="measured requests per arm")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured requests per arm")
    ap.add_argument("--engine", choices=["openai", "llama_cpp"], default="openai")
    ap.add_argument("--latency-ms", type=float, default=100.0, help="the fixed server's reply time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/tracing")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    progress = Progress("tracing")
    os.environ.pop("ANTHROPIC_API_KEY", None)
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        os.environ.pop(var, None)  # each arm's configuration says it all
    rng = random.Random(args.seed)
    port = free_port()
    receiver = OTLPReceiver().start()
    server = FixedLatencyServer(args.latency_ms / 1000).start() if args.engine == "openai" else None
    start_private_ray(8)
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    on_traces: list[str] = []
    off_traces: list[str] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base_url = server.url if server else None
        progress.say("deploying /off and /on")
        deploy("off", args.engine, base_url, {"exporters": ["none"]})
        deploy("on", args.engine, base_url, {"exporters": ["otlp"], "endpoint": receiver.endpoint})
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=300, headers=NO_CACHE
        ) as client:
            for arm in ("off", "on"):
                wait_ready(client, f"/{arm}")
                for i in range(args.warmup):
                    one(client, f"/{arm}", QUERIES[i % len(QUERIES)])
            for i in range(args.requests):
                progress.step(i, args.requests, "request pairs")
                query = QUERIES[i % len(QUERIES)]
                for arm in rng.sample(["off", "on"], 2):
                    ms, trace_id = one(client, f"/{arm}", query)
                    latencies[arm].append(ms)
                    (on_traces if arm == "on" else off_traces).append(trace_id)
        progress.say("waiting for the last spans")
        # The root (HTTP server) span ends last, in the orchestrator, whose batch exporter
        # flushes on its own schedule: wait for every traced request's root, not any span.
        receiver.wait_for(
            lambda spans: set(on_traces) <= {s.trace_id for s in spans if not s.parent_span_id},
            timeout=30,
        )
    finally:
        progress.done()
        serve.shutdown()
        ray.shutdown()
        receiver.stop()
        if server:
            server.stop()

    received = {s.trace_id for s in receiver.spans}
    spans_per_request = sum(1 for s in receiver.spans if s.trace_id in set(on_traces)) / len(
        on_traces
    )
    off, on = stats(latencies["off"]), stats(latencies["on"])
    overhead_p50 = (on["p50_ms"] / off["p50_ms"] - 1) * 100
    overhead_mean = (on["mean_ms"] / off["mean_ms"] - 1) * 100
    report = {
        "config": {
            "engine": args.engine,
            "fixed_latency_ms": args.latency_ms if args.engine == "openai" else None,
            "requests_per_arm": args.requests,
            "warmup": args.warmup,
            "cpus": os.cpu_count(),
            "target_overhead_pct": TARGET_PCT,
        },
        "off": off,
        "on": on,
        "overhead_pct_p50": round(overhead_p50, 2),
        "overhead_pct_mean": round(overhead_mean, 2),
        "traced_requests_received": sum(1 for t in on_traces if t in received),
        "spans_per_traced_request": round(spans_per_request, 1),
        "untraced_requests_exported": sum(1 for t in off_traces if t in received),
        "met": overhead_p50 <= TARGET_PCT,
    }
    md = [
        "# Tracing overhead",
        "",
        f"`/v1/answer` (mode slm) with tracing on (OTLP/HTTP to a local receiver) vs off, "
        f"{args.requests} requests each, alternating in random order in one cluster; SLM engine "
        f"`{args.engine}`"
        + (f" (fixed {args.latency_ms:.0f} ms replies)" if args.engine == "openai" else "")
        + f"; {os.cpu_count()} cores.",
        "",
        "| tracing | p50 (ms) | mean (ms) | p90 (ms) | p99 (ms) |",
        "|---|---|---|---|---|",
        f"| off | {off['p50_ms']:.1f} | {off['mean_ms']:.1f} | {off['p90_ms']:.1f} "
        f"| {off['p99_ms']:.1f} |",
        f"| on | {on['p50_ms']:.1f} | {on['mean_ms']:.1f} | {on['p90_ms']:.1f} "
        f"| {on['p99_ms']:.1f} |",
        "",
        f"Overhead: **{overhead_p50:+.1f} %** at p50, {overhead_mean:+.1f} % on the mean "
        f"(target <= {TARGET_PCT:.0f} %). Received {report['traced_requests_received']} of "
        f"{len(on_traces)} traced requests ({spans_per_request:.1f} spans each); "
        f"{report['untraced_requests_exported']} spans from the untraced arm.",
    ]

    def plot(ax: Any) -> None:
        ax.boxplot(
            [latencies["off"], latencies["on"]], tick_labels=["tracing off", "tracing on (OTLP)"]
        )
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"/v1/answer latency; p50 overhead {overhead_p50:+.1f} %")

    publish(Path(args.out), report, "\n".join(md), {"tracing_overhead.png": plot})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
