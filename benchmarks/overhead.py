"""What the cluster costs on top of the work itself, measured in one run on one machine.

1. Orchestration overhead: `/v1/answer` with `mode: slm` end to end over HTTP, against the same
   retrieval and generation called directly in this process (same index, same prompt, same max
   tokens, same llama.cpp threads), interleaved request by request. Target: <= 10 % at p50.
2. Serving throughput: generated tokens/s through the SLM deployment handle at saturation (more
   requests in flight than the replica runs at once) against llama.cpp alone, in this process,
   with the same requests and threads, interleaved batch by batch. Target: >= 0.9.

    python -m hybrid_serve.benchmarks.overhead --rounds 20 --out bench-out/overhead
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hybrid_serve.benchmarks.load import BUNDLED_QUERIES
from hybrid_serve.benchmarks.report import (
    NO_CACHE,
    Progress,
    percentile,
    start_private_ray,
    write_report,
)

PORT = 8767


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="HTTP vs direct request pairs")
    ap.add_argument("--batches", type=int, default=4, help="saturation batches per side")
    ap.add_argument("--batch", type=int, default=8, help="requests per saturation batch")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--contexts", type=int, default=1, help="llama.cpp contexts in the SLM replica")
    ap.add_argument(
        "--threads", type=int, help="threads per replica context (default: cores / contexts)"
    )
    ap.add_argument("--out", default="bench-out/overhead")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from hybrid_serve.agents import prompts
    from hybrid_serve.agents.citations import finalize
    from hybrid_serve.agents.confidence import score_answer
    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.deployments.app import build
    from hybrid_serve.engines.llama_cpp import LlamaCppEngine
    from hybrid_serve.retrieval.embedder import Embedder
    from hybrid_serve.retrieval.store import IndexStore
    from hybrid_serve.schemas import GenerationRequest

    progress = Progress("overhead")
    # llama.cpp alone gets every core; the replica gets them too, split over its contexts.
    threads = os.cpu_count() or 1
    replica_threads = args.threads or max(1, threads // args.contexts)
    cfg = HybridServeConfig.load(
        overrides={
            "data_dir": tempfile.mkdtemp(prefix="hs-overhead-"),
            "http.port": PORT,
            "slm.threads": replica_threads,
            "slm.contexts_per_replica": args.contexts,
            "slm.max_tokens": args.max_tokens,
        }
    )
    progress.say("starting the cluster")
    start_private_ray(4, PORT)
    serve.run(build(cfg), name="hybrid-serve", route_prefix="/")
    url = f"http://127.0.0.1:{PORT}"
    client = httpx.Client(base_url=url, timeout=600, headers=NO_CACHE)
    while client.get("/readyz").status_code != 200:
        time.sleep(0.5)

    progress.say("loading the same index, embedder and model in this process")
    rc = cfg.retriever
    embedder = Embedder(rc.embedding_model, batch_size=rc.embed_batch_size)
    store = IndexStore.from_config(cfg.index_dir, rc, embedder)
    store.refresh()
    engine = LlamaCppEngine(bundled_gguf(), n_threads=threads)

    def direct(query: str) -> float:
        t0 = time.perf_counter()
        passages = store.search(query, 5, rc.candidates, rc.rrf_k, rc.dense_weight, rc.bm25_weight)
        gen = engine.generate_blocking(
            GenerationRequest(
                messages=prompts.answer_messages(query, passages),
                max_tokens=args.max_tokens,
                temperature=cfg.slm.temperature,
                stop=prompts.ANSWER_STOP,
            )
        )
        text, citations = finalize(gen.text, passages)
        score_answer(query, text, citations, passages, gen.token_logprobs)
        return (time.perf_counter() - t0) * 1000

    def over_http(query: str) -> float:
        t0 = time.perf_counter()
        r = client.post("/v1/answer", json={"query": query, "mode": "slm", "verify": "never"})
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    for q in BUNDLED_QUERIES[:2]:  # warm both paths
        direct(q)
        over_http(q)
    http_ms, direct_ms = [], []
    for i in range(args.rounds):
        progress.step(i + 1, args.rounds, "HTTP vs direct")
        q = BUNDLED_QUERIES[i % len(BUNDLED_QUERIES)]
        http_ms.append(over_http(q))
        direct_ms.append(direct(q))

    # Saturation: a batch of requests in flight through the handle vs one after another direct.
    slm = serve.get_deployment_handle("SLM", app_name="hybrid-serve")
    reqs = [
        GenerationRequest(
            messages=[{"role": "user", "content": f"Write a few sentences about topic {i}."}],
            max_tokens=args.max_tokens,
        )
        for i in range(args.batch)
    ]

    async def through_handle() -> tuple[int, float]:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(slm.generate.remote(r) for r in reqs))
        return sum(r.completion_tokens for r in results), time.perf_counter() - t0

    def alone() -> tuple[int, float]:
        t0 = time.perf_counter()
        tokens = sum(engine.generate_blocking(r).completion_tokens for r in reqs)
        return tokens, time.perf_counter() - t0

    handle_tps, direct_tps = [], []
    for b in range(args.batches):
        progress.step(b + 1, args.batches, "saturation batches")
        tokens, seconds = asyncio.run(through_handle())
        handle_tps.append(tokens / seconds)
        tokens, seconds = alone()
        direct_tps.append(tokens / seconds)
    progress.done()
    client.close()
    serve.shutdown()
    ray.shutdown()

    p50_http, p50_direct = percentile(http_ms, 50), percentile(direct_ms, 50)
    report: dict[str, Any] = {
        "config": {
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "threads_direct": threads,
            "threads_per_replica_context": replica_threads,
            "batch": args.batch,
            "batches": args.batches,
            "contexts_per_replica": cfg.slm.contexts_per_replica,
        },
        "orchestration": {
            "http_ms": {"p50": p50_http, "p90": percentile(http_ms, 90)},
            "direct_ms": {"p50": p50_direct, "p90": percentile(direct_ms, 90)},
            "overhead_p50": round(p50_http / p50_direct - 1, 4),
            "target": 0.10,
        },
        "throughput": {
            "cluster_tokens_per_s": statistics.median(handle_tps),
            "direct_tokens_per_s": statistics.median(direct_tps),
            "ratio": round(statistics.median(handle_tps) / statistics.median(direct_tps), 4),
            "target": 0.9,
        },
    }
    o, t = report["orchestration"], report["throughput"]
    md = "\n".join(
        [
            "# Overhead of the cluster",
            "",
            f"{args.rounds} interleaved pairs, {args.max_tokens} max tokens; llama.cpp alone: "
            f"{threads} threads; the replica: {args.contexts} context(s) of {replica_threads} "
            "thread(s).",
            "",
            "| measure | cluster | direct | result | target |",
            "|---|---|---|---|---|",
            f"| `/v1/answer` (mode slm) p50 | {p50_http:.0f} ms | {p50_direct:.0f} ms | "
            f"{o['overhead_p50']:+.1%} | <= +10 % |",
            f"| generated tokens/s at saturation | {t['cluster_tokens_per_s']:.1f} | "
            f"{t['direct_tokens_per_s']:.1f} | x{t['ratio']:.2f} | >= 0.9 |",
        ]
    )

    def plot(ax: Any) -> None:
        ax.boxplot([direct_ms, http_ms], tick_labels=["direct (in process)", "HTTP + Serve"])
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"/v1/answer mode slm: overhead {o['overhead_p50']:+.1%} at p50")

    out = write_report(Path(args.out), report, md, {"overhead.png": plot})
    print(md)
    print(json.dumps(report["orchestration"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
