"""SLM tokens/s inside a Serve replica vs llama.cpp called directly, and /v1/answer latency.

Both sides run in one invocation, interleaved round by round, with the same prompt, max tokens
and threads, so the ratio is robust to a noisy machine. Writes report.json, report.md and
tokens_per_s.png to --out.

    python -m hybrid_serve.benchmarks.slm_serving --rounds 5 --out bench-out/slm_serving
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hybrid_serve.benchmarks.report import (
    NO_CACHE,
    Progress,
    percentile,
    start_private_ray,
    write_report,
)
from hybrid_serve.schemas import GenerationRequest

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short paragraph about the history of Paris."},
]
QUESTION = "What port does the HTTP API use?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--answers", type=int, default=20, help="/v1/answer requests to time")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="bench-out/slm_serving")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.deployments.app import build
    from hybrid_serve.engines.llama_cpp import LlamaCppEngine

    req = GenerationRequest(messages=PROMPT, max_tokens=args.max_tokens)
    progress = Progress("slm_serving")

    progress.say("loading llama.cpp in this process")
    direct = LlamaCppEngine(bundled_gguf(), n_threads=args.threads)

    data_dir = tempfile.mkdtemp(prefix="hs-bench-")
    port = 8765
    cfg = HybridServeConfig.load(
        overrides={"data_dir": data_dir, "http.port": port, "slm.threads": args.threads}
    )
    progress.say("starting Ray and the application")
    start_private_ray(4, port)
    serve.run(build(cfg), name="hybrid-serve", route_prefix="/")
    slm = serve.get_deployment_handle("SLM", app_name="hybrid-serve")
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
        time.sleep(0.5)

    # Warm both sides once (first call pays page faults and allocation).
    direct.generate_blocking(req)
    slm.generate.remote(req).result()

    rows: list[dict[str, Any]] = []
    for i in range(args.rounds):
        progress.step(i + 1, args.rounds, "direct vs replica")
        d = direct.generate_blocking(req)
        t0 = time.perf_counter()
        r = slm.generate.remote(req).result()
        handle_s = time.perf_counter() - t0
        rows.append(
            {
                "direct_tok_s": d.completion_tokens / d.seconds,
                "replica_tok_s": r.completion_tokens / r.seconds,
                "through_handle_tok_s": r.completion_tokens / handle_s,
                "tokens": r.completion_tokens,
            }
        )

    latencies = []
    with httpx.Client(timeout=300, headers=NO_CACHE) as client:
        client.post(f"{url}/v1/answer", json={"query": QUESTION})  # warm
        for i in range(args.answers):
            progress.step(i + 1, args.answers, "/v1/answer")
            t0 = time.perf_counter()
            r = client.post(f"{url}/v1/answer", json={"query": QUESTION})
            r.raise_for_status()
            latencies.append((time.perf_counter() - t0) * 1000)
    progress.done()

    serve.shutdown()
    ray.shutdown()

    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    report: dict[str, Any] = {
        "config": {
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "model": direct.model_name,
        },
        "tokens_per_s": {
            "direct_median": med["direct_tok_s"],
            "replica_median": med["replica_tok_s"],
            "through_handle_median": med["through_handle_tok_s"],
            "replica_over_direct": med["replica_tok_s"] / med["direct_tok_s"],
            "through_handle_over_direct": med["through_handle_tok_s"] / med["direct_tok_s"],
        },
        "answer_latency_ms": {
            "query": QUESTION,
            "n": len(latencies),
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "max": max(latencies),
        },
        "rounds": rows,
    }
    tps = report["tokens_per_s"]
    md = [
        "# SLM serving: replica vs llama.cpp direct",
        "",
        f"{args.rounds} interleaved rounds, {args.max_tokens} max tokens, {args.threads} threads.",
        "",
        "| path | tokens/s (median) | ratio to direct |",
        "|---|---|---|",
        f"| llama.cpp in-process | {tps['direct_median']:.1f} | 1.00 |",
        f"| inside the SLM replica | {tps['replica_median']:.1f} "
        f"| {tps['replica_over_direct']:.2f} |",
        f"| through the Serve handle | {tps['through_handle_median']:.1f} "
        f"| {tps['through_handle_over_direct']:.2f} |",
        "",
        f"`/v1/answer` for {QUESTION!r}: p50 {report['answer_latency_ms']['p50']:.0f} ms, "
        f"p90 {report['answer_latency_ms']['p90']:.0f} ms over {len(latencies)} requests.",
    ]

    def plot(ax: Any) -> None:
        labels = ["direct", "replica", "handle"]
        values = [tps["direct_median"], tps["replica_median"], tps["through_handle_median"]]
        ax.bar(labels, values, color=["#888", "#1f77b4", "#2ca02c"])
        ax.set_ylabel("generated tokens / s (median)")
        ax.set_title("SmolLM2-135M, llama.cpp: replica vs direct")

    out = write_report(Path(args.out), report, "\n".join(md), {"tokens_per_s.png": plot})
    print(json.dumps(report["tokens_per_s"], indent=2))
    print(json.dumps(report["answer_latency_ms"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
