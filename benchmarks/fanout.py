"""Fan-out efficiency of decomposed queries: k independent sub-tasks on r SLM replicas should take
about ceil(k/r) x one sub-task, not k x.

Everything goes through the deployed application over HTTP: `/v1/answer` with `mode: decompose`,
`sensitive: true` (the local planner, no Claude) and `stream: true`. The fan-out's wall time is
read from the stream itself, from the `plan` event to the last `subtask` event, and compared with
the median of single-sub-task requests measured in the same run and configuration. Two engines:

- `llama_cpp`: the real CPU model. On a 2-core machine the replicas share the cores, so this
  measures the cores as much as the framework.
- `openai`: the `openai` engine pointed at a local OpenAI-compatible server whose every reply takes
  a fixed time, so the ratio is the framework's own scheduling (routing, queueing, the handle).

    python -m hybrid_serve.benchmarks.fanout --out bench-out/fanout
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from hybrid_serve.benchmarks.fixed_latency_server import FixedLatencyServer
from hybrid_serve.benchmarks.report import NO_CACHE, Progress, publish, start_private_ray

# The same question k times: with greedy decoding every sub-task generates the same tokens, so
# the comparison is between schedules, not between answers of different lengths.
QUESTION = "What port does the HTTP API use?"
TARGET = 1.15


def fanout_seconds(client: httpx.Client, k: int) -> tuple[float, int]:
    """(seconds from the plan to the last sub-task, sub-tasks answered) for one request."""
    query = " ".join([QUESTION] * k)
    body = {"query": query, "mode": "decompose", "sensitive": True, "verify": "never"}
    plan_at = last_at = None
    answered = planned = 0
    with connect_sse(client, "POST", "/v1/answer", json={**body, "stream": True}) as source:
        source.response.raise_for_status()
        for sse in source.iter_sse():
            now = time.perf_counter()
            data = sse.json()
            if sse.event == "plan":
                plan_at, planned = now, len(data["subtasks"])
            elif sse.event == "subtask":
                last_at = now
                answered += data["status"] == "ok"
            elif sse.event == "error":
                raise RuntimeError(data)
    if plan_at is None or last_at is None or planned != k:
        raise RuntimeError(f"expected a plan of {k} sub-tasks, got {planned}")
    return last_at - plan_at, answered


def run_config(
    engine: str,
    replicas: int,
    ks: list[int],
    rounds: int,
    max_tokens: int,
    base_url: str | None,
    progress: Progress,
) -> list[dict[str, Any]]:
    from ray import serve

    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.deployments.app import build

    port = 8766
    overrides: dict[str, Any] = {
        "data_dir": tempfile.mkdtemp(prefix="hs-fanout-"),
        "http.port": port,
        "slm.replicas": replicas,
        "slm.contexts_per_replica": 1,
        "slm.max_tokens": max_tokens,
        "slm.engine": engine,
        "slm.num_cpus": 1 if engine == "llama_cpp" else 0.1,
    }
    if base_url:
        overrides["slm.openai.base_url"] = base_url
        overrides["slm.model_name"] = "slm"
    cfg = HybridServeConfig.load(overrides=overrides)
    progress.say(f"{engine} r={replicas}: deploying")
    serve.run(build(cfg), name="hybrid-serve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=600, headers=NO_CACHE) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.5)
        for _ in range(replicas):  # every replica warm
            fanout_seconds(client, replicas)
        rows = []
        singles = []
        for i in range(rounds * 2):
            progress.say(f"{engine} r={replicas}: single sub-task {i + 1}/{rounds * 2}")
            singles.append(fanout_seconds(client, 1)[0])
        single = statistics.median(singles)
        for k in ks:
            walls = []
            for i in range(rounds):
                progress.say(f"{engine} r={replicas}: k={k} round {i + 1}/{rounds}")
                wall, answered = fanout_seconds(client, k)
                if answered != k:
                    raise RuntimeError(f"{k - answered} of {k} sub-tasks did not answer")
                walls.append(wall)
            wall = statistics.median(walls)
            ideal = math.ceil(k / replicas) * single
            rows.append(
                {
                    "engine": engine,
                    "replicas": replicas,
                    "k": k,
                    "single_subtask_s": round(single, 4),
                    "wall_s": round(wall, 4),
                    "ideal_s": round(ideal, 4),
                    "serial_s": round(k * single, 4),
                    "ratio": round(wall / ideal, 3),
                    "rounds": [round(w, 4) for w in walls],
                }
            )
    serve.delete("hybrid-serve")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="2,4,8", help="sub-tasks per request")
    ap.add_argument("--replicas", default="1,2", help="SLM replica counts")
    ap.add_argument("--engines", default="openai,llama_cpp")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--latency-ms", type=float, default=500.0, help="the fixed server's reply time")
    ap.add_argument("--out", default="bench-out/fanout")
    args = ap.parse_args(argv)
    ks = [int(x) for x in args.ks.split(",")]
    replica_counts = [int(x) for x in args.replicas.split(",")]

    import ray
    from ray import serve

    progress = Progress("fanout")
    start_private_ray(8, 8766)
    server = FixedLatencyServer(args.latency_ms / 1000).start()
    rows: list[dict[str, Any]] = []
    try:
        for engine in args.engines.split(","):
            for r in replica_counts:
                url = server.url if engine == "openai" else None
                rows += run_config(engine, r, ks, args.rounds, args.max_tokens, url, progress)
    finally:
        progress.done()
        server.stop()
        serve.shutdown()
        ray.shutdown()

    report = {
        "config": {
            "ks": ks,
            "replicas": replica_counts,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "fixed_latency_ms": args.latency_ms,
            "contexts_per_replica": 1,
            "cpus": os.cpu_count(),
            "target_ratio": TARGET,
        },
        "results": rows,
    }
    md = [
        "# Fan-out efficiency",
        "",
        "Wall time of k independent sub-tasks (from the `plan` event to the last `subtask` event "
        "of a streamed `/v1/answer`) against ceil(k/r) x the median single sub-task of the same "
        f"run and configuration; target <= {TARGET}. `openai`: a local OpenAI-compatible server "
        f"answering in a fixed {args.latency_ms:.0f} ms. `llama_cpp`: SmolLM2-135M on "
        f"{os.cpu_count()} cores shared by all replicas.",
        "",
        "| engine | replicas | k | single (s) | wall (s) | ideal (s) | serial (s) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        md.append(
            f"| {row['engine']} | {row['replicas']} | {row['k']} | {row['single_subtask_s']:.2f} "
            f"| {row['wall_s']:.2f} | {row['ideal_s']:.2f} | {row['serial_s']:.2f} "
            f"| {row['ratio']:.2f} |"
        )

    def plot(ax: Any) -> None:
        for engine in dict.fromkeys(r["engine"] for r in rows):
            for n in replica_counts:
                sel = [r for r in rows if r["engine"] == engine and r["replicas"] == n]
                ax.plot(
                    [r["k"] for r in sel],
                    [r["ratio"] for r in sel],
                    marker="o",
                    label=f"{engine}, r={n}",
                )
        ax.axhline(TARGET, color="red", linestyle="--", linewidth=1, label=f"target {TARGET}")
        ax.axhline(1.0, color="#888", linewidth=0.8)
        ax.set_xlabel("independent sub-tasks k")
        ax.set_ylabel("wall / (ceil(k/r) x single)")
        ax.set_xticks(ks)
        ax.set_title("Fan-out efficiency")
        ax.legend(fontsize=8)

    publish(Path(args.out), report, "\n".join(md), {"fanout_ratio.png": plot})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
