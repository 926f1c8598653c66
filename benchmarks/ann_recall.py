"""Dense index types: recall@10 against exact search, and query latency, as the corpus grows.

Real vectors: the SQuAD paragraphs of `../shared/data/squad` embedded with the bundled MiniLM,
queried with their questions. Larger corpora are simulated by adding distractors made from those
paragraph vectors plus noise (normalised), so the neighbourhood structure stays MiniLM-like.
Recall is measured against flat (exact) search on the same vectors in the same run.

    python -m hybrid_serve.benchmarks.ann_recall --sizes 913,20000,100000 --out bench-out/ann
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_serve.benchmarks.confidence_signal import load_squad
from hybrid_serve.benchmarks.report import Progress, percentile, publish
from hybrid_serve.retrieval import ann
from hybrid_serve.retrieval.ann import ANNSpec

SQUAD = Path(__file__).resolve().parents[2] / "shared/data/squad/squad-v1.1-dev-part-a.json"
SPECS = {
    "flat": ANNSpec(kind="flat"),
    "hnsw (M=32, ef=128)": ANNSpec(kind="hnsw"),
    "hnsw (M=32, ef=32)": ANNSpec(kind="hnsw", hnsw_ef_search=32),
    "ivf (nprobe=16)": ANNSpec(kind="ivf", ivf_nprobe=16),
    "ivf (nprobe=4)": ANNSpec(kind="ivf", ivf_nprobe=4),
}


def corpus(base: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if size <= len(base):
        return base[:size]
    picks = base[rng.integers(0, len(base), size - len(base))]
    noise = rng.standard_normal(picks.shape).astype(np.float32) * 0.35 / np.sqrt(base.shape[1])
    extra = picks + noise
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    return np.vstack([base, extra]).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squad", default=str(SQUAD))
    ap.add_argument("--sizes", default="913,20000,100000")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--out", default="bench-out/ann")
    args = ap.parse_args(argv)

    from hybrid_serve.retrieval.embedder import Embedder

    progress = Progress("ann")
    docs, questions = load_squad(Path(args.squad))
    embedder = Embedder()
    progress.say(f"embedding {len(docs)} paragraphs")
    base = embedder.encode([f"{d['title']}\n{d['text']}" for d in docs])
    q = embedder.encode([x["question"] for x in questions[: args.queries]])
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for size in [int(s) for s in args.sizes.split(",")]:
        x = corpus(base, size, rng)
        exact = None
        for name, spec in SPECS.items():
            progress.say(f"n={size}: building {name}")
            t0 = time.perf_counter()
            index = ann.build(x, spec)
            build_s = time.perf_counter() - t0
            index.search(q[:5], 10)  # warm
            latencies = []
            ids = []
            for row in q:
                t0 = time.perf_counter()
                _, found = index.search(row[None, :], 10)
                latencies.append((time.perf_counter() - t0) * 1000)
                ids.append(found[0])
            if exact is None:
                exact = ids
            recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact)]))
            rows.append(
                {
                    "index": name,
                    "vectors": size,
                    "recall_at_10_vs_exact": round(recall, 4),
                    "query_ms_p50": round(percentile(latencies, 50), 4),
                    "query_ms_p99": round(percentile(latencies, 99), 4),
                    "build_s": round(build_s, 3),
                }
            )
    progress.done()
    md = [
        "# Dense index types",
        "",
        f"MiniLM vectors of {len(docs)} SQuAD paragraphs (plus noisy copies beyond that size), "
        f"{len(q)} SQuAD questions, one query at a time, 1 thread per query. Recall@10 is "
        "against exact (flat) search in the same run.",
        "",
        "| index | vectors | recall@10 | p50 ms | p99 ms | build s |",
        "|---|---|---|---|---|---|",
    ] + [
        f"| {r['index']} | {r['vectors']} | {r['recall_at_10_vs_exact']:.3f} | "
        f"{r['query_ms_p50']:.3f} | {r['query_ms_p99']:.3f} | {r['build_s']:.2f} |"
        for r in rows
    ]

    def plot(ax: Any) -> None:
        for name in SPECS:
            sel = [r for r in rows if r["index"] == name]
            ax.plot([r["vectors"] for r in sel], [r["query_ms_p50"] for r in sel], "o-", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vectors")
        ax.set_ylabel("query latency p50 (ms)")
        ax.set_title("Dense search latency by index type")
        ax.legend(fontsize=8)

    publish(Path(args.out), {"results": rows}, "\n".join(md), {"ann_latency.png": plot})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
