"""The index at corpus scale: the cost of a small write as the index grows (whole snapshots before,
segments now), ingestion rate (one process vs the Ray Data pipeline), and search on a million
chunks (flat vs IVF-PQ: latency, recall@10 against exact search, resident memory).

Vectors are MiniLM-like: the bundled model's embeddings of the SQuAD paragraphs, plus noisy
copies of them beyond that count (as `benchmarks.ann_recall`); chunk texts are 12 words drawn
from the SQuAD vocabulary; queries are SQuAD questions. The "before" store is the
whole-snapshot store of an earlier commit (`--baseline-ref`, read from git), measured in the
same run.

    python -m hybrid_serve.benchmarks.index_scale --writes --sizes 10000,100000,1000000
    python -m hybrid_serve.benchmarks.index_scale --search --search-size 1000000
    python -m hybrid_serve.benchmarks.index_scale --ingest
    python -m hybrid_serve.benchmarks.index_scale --recall
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_serve.benchmarks.ann_recall import SQUAD
from hybrid_serve.benchmarks.confidence_signal import load_squad
from hybrid_serve.benchmarks.report import Progress, percentile, publish
from hybrid_serve.retrieval.ann import ANNSpec
from hybrid_serve.retrieval.segment import ChunkRecord, DocRecord
from hybrid_serve.retrieval.store import IndexStore, NewDocument

REPO = Path(__file__).resolve().parents[1]
DIM = 384


def written_bytes() -> int:
    """Bytes this process passed to write() so far (Linux /proc/self/io `wchar`)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def rss() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


class Synthetic:
    """Vectors and texts of a synthetic corpus; queries map to their real embeddings."""

    def __init__(self, squad: Path) -> None:
        from hybrid_serve.retrieval.embedder import Embedder

        docs, questions = load_squad(squad)
        embedder = Embedder()
        self.base = embedder.encode([f"{d['title']}\n{d['text']}" for d in docs])
        words = sorted({w.strip(".,;:()\"'").lower() for d in docs for w in d["text"].split()})
        self.words = np.array([w for w in words if w.isalpha()])
        self.questions = [q["question"] for q in questions[:300]]
        self.query_vectors = embedder.encode(self.questions)
        self.rng = np.random.default_rng(0)

    def vectors(self, n: int) -> np.ndarray:
        """The paragraphs' vectors, then blends of two paragraphs plus noise: distinct points
        with MiniLM's neighbourhood structure, not thousands of near-copies of one paragraph
        (which no index can rank among, exact ties aside)."""
        if n <= len(self.base):
            return self.base[:n].copy()
        out = np.empty((n, DIM), dtype=np.float32)
        out[: len(self.base)] = self.base
        for start in range(len(self.base), n, 100_000):
            m = min(100_000, n - start)
            a = self.base[self.rng.integers(0, len(self.base), m)]
            b = self.base[self.rng.integers(0, len(self.base), m)]
            w = self.rng.uniform(0.5, 1.0, (m, 1)).astype(np.float32)
            noise = self.rng.standard_normal((m, DIM)).astype(np.float32) * (0.15 / np.sqrt(DIM))
            v = w * a + (1 - w) * b + noise
            out[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return out

    def texts(self, n: int, offset: int = 0) -> list[str]:
        picks = self.rng.integers(0, len(self.words), (n, 12))
        return [f"Row {offset + i} " + " ".join(self.words[p]) for i, p in enumerate(picks)]

    def embed(self, texts: Any) -> np.ndarray:
        """Synthetic vectors for new chunks (near a random paragraph's)."""
        picks = self.base[self.rng.integers(0, len(self.base), len(texts))]
        noisy = picks + self.rng.standard_normal(picks.shape).astype(np.float32) * 0.02
        return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)

    def records(self, n: int, offset: int = 0) -> tuple[list[DocRecord], list[ChunkRecord]]:
        docs, chunks = [], []
        for i, text in enumerate(self.texts(n, offset)):
            doc_id = f"d{offset + i}"
            docs.append(DocRecord(doc_id, "T", text, {}, [f"{doc_id}#0"]))
            chunks.append(ChunkRecord(f"{doc_id}#0", doc_id, "T", text))
        return docs, chunks


def load_baseline(ref: str) -> Any:
    """The whole-snapshot store as it was at `ref`, loaded from git."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{ref}:retrieval/store.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("hybrid_serve_baseline_store", loader=None)
    assert spec is not None  # a name and no loader always make a spec
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{ref}:retrieval/store.py", "exec"), module.__dict__)
    return module


def add_100(store: Any, syn: Synthetic, size: int) -> dict[str, Any]:
    docs = [NewDocument(id=f"new{i}", title="New", text=t) for i, t in enumerate(syn.texts(100))]
    before = written_bytes()
    t0 = time.perf_counter()
    store.upsert(docs)
    return {
        "seconds": round(time.perf_counter() - t0, 4),
        "bytes_written": written_bytes() - before,
    }


def bench_writes(args: argparse.Namespace, syn: Synthetic, progress: Progress) -> list[dict]:
    baseline = load_baseline(args.baseline_ref)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        docs, chunks = syn.records(size)
        vectors = syn.vectors(size)
        for kind in ("snapshots", "segments"):
            root = Path(tempfile.mkdtemp(prefix=f"scale-{kind}-", dir=args.work))
            progress.say(f"{size} chunks: building the {kind} index")
            if kind == "segments":
                store = IndexStore(root, syn.embed, DIM)
                store.add_embedded(docs, chunks, vectors)
            else:
                store = baseline.IndexStore(root, syn.embed, DIM)
                with store._writer():
                    store._commit(
                        store._next_snapshot(
                            set(), [baseline.DocRecord(**d.__dict__) for d in docs],
                            [baseline.ChunkRecord(c.chunk_id, c.doc_id, c.title, c.text)
                             for c in chunks],
                            vectors,
                        )
                    )  # fmt: skip
            progress.say(f"{size} chunks: adding 100 to the {kind} index")
            row = {"store": kind, "chunks": size, **add_100(store, syn, size)}
            rows.append(row)
            progress.say(f"{row}")
            del store
            shutil.rmtree(root, ignore_errors=True)
    return rows


SEARCH_ARMS = {
    "flat": ANNSpec(kind="flat"),
    **{
        f"ivf_pq (nprobe {nprobe}, refine {refine})": ANNSpec(
            kind="ivf_pq", ivf_nlist=1024, ivf_nprobe=nprobe, refine_factor=refine
        )
        for nprobe, refine in ((16, 4), (16, 16), (32, 16), (16, 32), (64, 32))
    },
}


def search_worker(root: str, arm: str, truth: str, out: str) -> None:
    """In a fresh process (for its memory): load, search, measure."""
    folder = Path(truth).parent
    questions = json.loads((folder / "questions.json").read_text())
    query_vectors = np.load(folder / "questions.npy")
    lookup = dict(zip(questions, query_vectors))

    def embed(texts: Any) -> np.ndarray:
        return np.vstack([lookup[t] for t in texts]).astype(np.float32)

    spec = SEARCH_ARMS[arm]
    loaded0 = time.perf_counter()
    store = IndexStore(root, embed, DIM, ann_spec=spec)
    store.refresh()
    load_s = time.perf_counter() - loaded0
    after_load = rss()
    if store.view is None:
        raise RuntimeError(f"no index at {root}")
    seg = store.view.segments[0]
    exact = np.load(truth)
    latencies, found = [], []
    for q in questions[:5]:
        store.search(q, 5)  # warm
    for i, q in enumerate(questions):
        t0 = time.perf_counter()
        store.search(q, 5)
        latencies.append((time.perf_counter() - t0) * 1000)
        _, rows = seg.search_dense(query_vectors[i : i + 1], 10, None)
        found.append(rows)
    recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)]))
    Path(out).write_text(
        json.dumps(
            {
                "index": arm,
                "chunks": seg.rows,
                "load_s": round(load_s, 2),
                "search_ms_p50": round(percentile(latencies, 50), 2),
                "search_ms_p99": round(percentile(latencies, 99), 2),
                "dense_recall_at_10_vs_exact": round(recall, 4),
                "rss_mb_after_load": after_load,
                "rss_mb_after_queries": rss(),
            }
        )
    )


def bench_search(args: argparse.Namespace, syn: Synthetic, progress: Progress) -> list[dict]:
    import faiss

    size = args.search_size
    root = Path(tempfile.mkdtemp(prefix="scale-search-", dir=args.work))
    progress.say(f"building a {size}-chunk segment with its IVF-PQ index")
    docs, chunks = syn.records(size)
    vectors = syn.vectors(size)
    spec = ANNSpec(kind="ivf_pq", ivf_nlist=1024, ivf_nprobe=16)
    t0 = time.perf_counter()
    IndexStore(root / "index", syn.embed, DIM, ann_spec=spec).add_embedded(docs, chunks, vectors)
    build_s = time.perf_counter() - t0
    del docs, chunks
    progress.say("exact top-10 for the queries")
    flat = faiss.IndexFlatIP(DIM)
    flat.add(vectors)
    _, exact = flat.search(syn.query_vectors, 10)
    del flat, vectors
    truth = root / "truth.npy"
    np.save(truth, exact)
    np.save(root / "questions.npy", syn.query_vectors)
    (root / "questions.json").write_text(json.dumps(syn.questions))
    rows = []
    for i, arm in enumerate(SEARCH_ARMS):
        progress.say(f"{arm}: searching in a fresh process")
        out = root / f"arm-{i}.json"
        subprocess.run(
            [sys.executable, "-m", "hybrid_serve.benchmarks.index_scale", "--search-worker",
             str(root / "index"), arm, str(truth), str(out)],
            check=True,
        )  # fmt: skip
        rows.append({**json.loads(out.read_text()), "build_s": round(build_s, 1)})
        progress.say(f"{rows[-1]}")
    shutil.rmtree(root, ignore_errors=True)
    return rows


def bench_ingest(args: argparse.Namespace, progress: Progress) -> list[dict]:
    import ray

    from hybrid_serve.cluster import ingest
    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.retrieval.embedder import Embedder

    docs, _ = load_squad(Path(args.squad))
    docs = docs[: args.ingest_docs]
    work = Path(tempfile.mkdtemp(prefix="scale-ingest-", dir=args.work))
    records = work / "corpus.jsonl"
    records.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "title": d["title"], "text": d["text"]}) + "\n"
            for i, d in enumerate(docs)
        )
    )
    cfg = HybridServeConfig(data_dir=work / "one")
    store = IndexStore.from_config(cfg.index_dir, cfg.retriever, Embedder())
    progress.say(f"one process: {len(docs)} paragraphs in batches of 64")
    t0 = time.perf_counter()
    for start in range(0, len(docs), 64):
        store.upsert(
            [NewDocument(id=f"p{start + i}", title=d["title"], text=d["text"])
             for i, d in enumerate(docs[start : start + 64])]
        )  # fmt: skip
    one_s = time.perf_counter() - t0
    chunks = store.stats()["chunks"]
    rows = [{"path": "one process (server path)", "workers": 1, "chunks": chunks,
             "seconds": round(one_s, 1), "chunks_per_s": round(chunks / one_s, 1)}]  # fmt: skip
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        for workers in sorted({1, args.ray_cpus}):
            cfg = HybridServeConfig(data_dir=work / f"ray-{workers}")
            progress.say(f"Ray Data pipeline, {workers} embedding actor(s)")
            r = ingest.run(cfg, [records], workers=workers, segment_chunks=2000)
            rows.append({"path": "Ray Data pipeline", "workers": workers, "chunks": r.chunks,
                         "seconds": round(r.seconds, 1),
                         "chunks_per_s": round(r.chunks_per_s, 1)})  # fmt: skip
            progress.say(f"{rows[-1]}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_recall(args: argparse.Namespace, progress: Progress) -> list[dict]:
    """SQuAD retrieval recall: the snapshot store vs segments (one, and one per 50 paragraphs)."""
    from hybrid_serve.benchmarks.scoring import recall_at_k
    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.retrieval.embedder import Embedder

    rc = HybridServeConfig().retriever
    docs, questions = load_squad(Path(args.squad))
    embedder = Embedder()
    cache: dict[str, np.ndarray] = {}

    def embed(texts: Any) -> np.ndarray:
        missing = [t for t in texts if t not in cache]
        if missing:
            cache.update(zip(missing, embedder.encode(missing)))
        return np.vstack([cache[t] for t in texts])

    new = [NewDocument(id=d["id"], title=d["title"], text=d["text"]) for d in docs]
    baseline = load_baseline(args.baseline_ref)
    work = Path(tempfile.mkdtemp(prefix="scale-recall-", dir=args.work))
    kw: dict[str, Any] = {
        "chunk_words": rc.chunk_words,
        "chunk_overlap_words": rc.chunk_overlap_words,
    }
    stores = {
        f"snapshots ({args.baseline_ref})": baseline.IndexStore(work / "a", embed, DIM, **kw),
        "segments: one": IndexStore(work / "b", embed, DIM, **kw),
        "segments: one per 50 paragraphs": IndexStore(work / "c", embed, DIM, merge_factor=1000,
                                                      **kw),
    }  # fmt: skip
    rows = []
    for name, store in stores.items():
        progress.say(f"{name}: indexing {len(docs)} paragraphs")
        step = 50 if "per 50" in name else len(new)
        for start in range(0, len(new), step):
            store.upsert(new[start : start + step])
        ranked = []
        for i, q in enumerate(questions):
            hits = store.search(q["question"], 10, rc.candidates, rc.rrf_k, rc.dense_weight,
                                rc.bm25_weight)  # fmt: skip
            ranked.append([h.doc_id for h in hits])
            progress.step(i + 1, len(questions), name)
        row = {"store": name, "questions": len(questions)}
        for k in (1, 5, 10):
            row[f"recall_at_{k}"] = round(
                float(
                    np.mean([recall_at_k(r, {q["doc_id"]}, k) for r, q in zip(ranked, questions)])
                ),
                4,
            )
        if hasattr(store, "view"):
            row["segments"] = len(store.view.segments)
        rows.append(row)
        progress.say(f"{row}")
    shutil.rmtree(work, ignore_errors=True)
    return rows


def report(
    out: Path, writes: list, search: list, ingest_rows: list, recall: list, ref: str
) -> None:
    md = ["# The index at corpus scale", ""]
    if recall:
        md += [
            f"## SQuAD retrieval recall ({recall[0]['questions']} questions, hybrid search as "
            "served)", "",
            "| store | recall@1 | recall@5 | recall@10 |",
            "|---|---|---|---|",
        ] + [
            f"| {r['store']}" + (f" ({r['segments']} segments)" if "segments" in r else "")
            + f" | {r['recall_at_1']:.4f} | {r['recall_at_5']:.4f} | {r['recall_at_10']:.4f} |"
            for r in recall
        ] + [""]  # fmt: skip
    if writes:
        md += [
            f"## Adding 100 chunks (one upsert) — before: whole snapshots (`{ref}`), after: "
            "segments", "",
            "| index size (chunks) | store | seconds | bytes written | ratio before/after |",
            "|---|---|---|---|---|",
        ]  # fmt: skip
        for size in sorted({r["chunks"] for r in writes}):
            pair = {r["store"]: r for r in writes if r["chunks"] == size}
            for kind in ("snapshots", "segments"):
                r = pair.get(kind)
                if r:
                    ratio = ""
                    if kind == "segments" and "snapshots" in pair:
                        ratio = f"{pair['snapshots']['seconds'] / max(r['seconds'], 1e-6):.0f}x"
                    md.append(
                        f"| {size:,} | {kind} | {r['seconds']:.3f} | {r['bytes_written']:,} | "
                        f"{ratio} |"
                    )
        md.append("")
    if search:
        md += [
            f"## Search at {search[0]['chunks']:,} chunks (one segment, 300 SQuAD questions)", "",
            "| dense index | hybrid search p50 ms | p99 ms | dense recall@10 vs exact | "
            "RSS after load MB (anon / file) | RSS after queries MB (anon / file) | load s |",
            "|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in search:
            a, q = r["rss_mb_after_load"], r["rss_mb_after_queries"]
            md.append(
                f"| {r['index']} | {r['search_ms_p50']} | {r['search_ms_p99']} | "
                f"{r['dense_recall_at_10_vs_exact']:.3f} | {a['VmRSS']} ({a['RssAnon']} / "
                f"{a['RssFile']}) | {q['VmRSS']} ({q['RssAnon']} / {q['RssFile']}) | "
                f"{r['load_s']} |"
            )
        md.append("")
    if ingest_rows:
        md += [
            "## Ingestion rate (SQuAD paragraphs, bundled MiniLM, this machine)", "",
            "| path | embedding workers | chunks | seconds | chunks/s |",
            "|---|---|---|---|---|",
        ] + [
            f"| {r['path']} | {r['workers']} | {r['chunks']} | {r['seconds']} | "
            f"{r['chunks_per_s']} |"
            for r in ingest_rows
        ] + [
            "",
            "Scaling model: the pipeline runs at min(N x r, w): N embedding actors at the "
            "embedder's own rate r on their device, and w the driver's publishing rate (records, "
            "postings, fsync of one segment at a time). The pipeline's time includes staging, "
            "Ray Data start-up and compaction.",
        ]  # fmt: skip

    def plot_writes(ax: Any) -> None:
        for kind, style in (("snapshots", "o-"), ("segments", "s-")):
            sel = [r for r in writes if r["store"] == kind]
            ax.plot([r["chunks"] for r in sel], [r["seconds"] for r in sel], style, label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("chunks in the index")
        ax.set_ylabel("seconds to add 100 chunks")
        ax.set_title("Cost of a small write")
        ax.legend()

    plots = {"writes.png": plot_writes} if writes else {}
    if ingest_rows:

        def plot_ingest(ax: Any) -> None:
            labels = [f"{r['path'].split(' (')[0]}\n{r['workers']} worker(s)" for r in ingest_rows]
            ax.bar(labels, [r["chunks_per_s"] for r in ingest_rows])
            ax.set_ylabel("chunks/s")
            ax.set_title("Ingestion rate")

        plots["ingest.png"] = plot_ingest
    if recall:

        def plot_recall(ax: Any) -> None:
            names = [r["store"].split(" (")[0] for r in recall]
            for k in (1, 5, 10):
                values = [r[f"recall_at_{k}"] for r in recall]
                ax.plot(names, values, "o-", label=f"recall@{k}")
            ax.set_ylabel("recall")
            ax.set_title("SQuAD retrieval recall by store")
            ax.legend()

        plots["recall.png"] = plot_recall
    data = {"writes": writes, "search": search, "ingest": ingest_rows, "recall": recall}
    publish(out, data, "\n".join(md), plots)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--search-worker":
        search_worker(*argv[1:5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", action="store_true", help="small-write cost by index size")
    ap.add_argument("--search", action="store_true", help="search at --search-size chunks")
    ap.add_argument("--ingest", action="store_true", help="one process vs Ray Data pipeline")
    ap.add_argument("--recall", action="store_true", help="SQuAD retrieval recall, before/after")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--search-size", type=int, default=1_000_000)
    ap.add_argument("--ingest-docs", type=int, default=913)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--baseline-ref", default="dfc87f3", help="commit of the snapshot store")
    ap.add_argument("--squad", default=str(SQUAD))
    ap.add_argument("--work", default=None, help="scratch folder (default: the system's)")
    ap.add_argument("--out", default="bench-out/index_scale")
    args = ap.parse_args(argv)
    if not (args.writes or args.search or args.ingest or args.recall):
        args.writes = args.search = args.ingest = args.recall = True
    progress = Progress("index_scale")
    syn = Synthetic(Path(args.squad)) if args.writes or args.search else None
    writes = bench_writes(args, syn, progress) if syn is not None and args.writes else []
    search = bench_search(args, syn, progress) if syn is not None and args.search else []
    ingest_rows = bench_ingest(args, progress) if args.ingest else []
    recall = bench_recall(args, progress) if args.recall else []
    progress.done()
    report(Path(args.out), writes, search, ingest_rows, recall, args.baseline_ref)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
