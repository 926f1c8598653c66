"""Bulk ingestion on Ray Data: read → chunk → embed (an actor pool, on GPUs where the cluster has
them) → write segments, for inputs too large for one retriever replica's loop.

The driver (this process, on a machine that mounts the index) validates the records (bad ones
are reported by line and skipped), keeps the last copy of each id, drops documents the index
already holds unchanged, and stages the rest as Parquet shards. Ray Data reads the shards, chunks
them in tasks and embeds the chunks in a pool of actors, each holding one copy of the embedding
model; the driver gathers whole documents and publishes them as segments of about
`segment_chunks` chunks, each all-or-nothing and durable before the next. A run that stops
(crash, Ctrl-C) keeps every published segment, and running it again skips what they hold: the
job resumes. Retriever replicas pick the segments up on their next search, and compaction merges
them in the background like any other write.

Throughput model: each embed actor runs at the embedder's own rate r (chunks/s on its device);
the pipeline runs at min(N x r, w), N actors and w the driver's publishing rate (SQLite records,
BM25 postings, fsync), so it scales with workers until the driver's write path binds. Measured
by `python -m hybrid_serve.benchmarks.index_scale --ingest`.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_serve.config import HybridServeConfig
from hybrid_serve.retrieval.chunking import chunk_text
from hybrid_serve.retrieval.embedder import Embedder
from hybrid_serve.retrieval.records import BadRecord, FieldNames, read_records
from hybrid_serve.retrieval.segment import ChunkRecord, DocRecord, document_records
from hybrid_serve.retrieval.store import IndexStore, NewDocument
from hybrid_serve.schemas import DEFAULT_COLLECTION

SHARD_DOCS = 20_000
STAGE_CPUS = 0.25  # what a read or chunk task asks for: light next to embedding


@dataclass
class BulkResult:
    documents: int = 0  # published by this run
    chunks: int = 0
    unchanged: int = 0  # already indexed with the same content (a resumed run skips them)
    duplicates: int = 0  # earlier copies of an id later in the input
    bad: list[BadRecord] = field(default_factory=list)
    segments: int = 0
    version: int = 0
    seconds: float = 0.0
    workers: int = 0
    device: str = "CPU"  # what the embedding actors were given

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0


@dataclass
class Progress:
    """Callbacks a front end draws (the CLI: rich bars)."""

    staged: Callable[[int], None] = lambda n: None
    published: Callable[[int, int], None] = lambda docs, chunks: None


def scan(
    paths: Sequence[Path], fields: FieldNames, result: BulkResult, collection: str
) -> dict[str, int]:
    """First pass: report bad records, and find each id's last copy (its sequence number)."""
    last: dict[str, int] = {}
    for seq, (_, item) in enumerate(_all_records(paths, fields)):
        if isinstance(item, BadRecord):
            result.bad.append(item)
            continue
        doc_id = _new_document(item, collection).key()
        if doc_id in last:
            result.duplicates += 1
        last[doc_id] = seq
    return last


def _all_records(paths: Sequence[Path], fields: FieldNames) -> Iterator[tuple[int, Any]]:
    for path in paths:
        yield from read_records(path, fields)


def _new_document(item: Any, collection: str) -> NewDocument:
    return NewDocument(
        text=item.text, title=item.title, id=item.id, metadata=item.metadata, collection=collection
    )


def stage(
    paths: Sequence[Path],
    fields: FieldNames,
    last: dict[str, int],
    store: IndexStore,
    folder: Path,
    result: BulkResult,
    progress: Progress,
    collection: str = DEFAULT_COLLECTION,
) -> int:
    """Second pass: write the documents to index (last copies, changed or new) as Parquet shards,
    each under its stored key (its id within `collection`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    shard: list[dict[str, Any]] = []
    staged = 0

    def flush() -> None:
        nonlocal staged
        if not shard:
            return
        records = [
            DocRecord(
                id=r["id"], title=r["title"], text=r["text"], metadata=json.loads(r["metadata"])
            )
            for r in shard
        ]
        same = store.unchanged(records)
        keep = [r for r in shard if r["id"] not in same]
        result.unchanged += len(shard) - len(keep)
        if keep:
            pq.write_table(pa.Table.from_pylist(keep), folder / f"part-{staged:09d}.parquet")
            staged += len(keep)
            progress.staged(staged)
        shard.clear()

    for seq, (_, item) in enumerate(_all_records(paths, fields)):
        if isinstance(item, BadRecord):
            continue
        doc = _new_document(item, collection)
        doc_id = doc.key()
        if last.get(doc_id) != seq:
            continue
        shard.append(
            {
                "id": doc_id,
                "title": doc.title,
                "text": doc.text,
                "metadata": json.dumps(doc.metadata, ensure_ascii=False),
            }
        )
        if len(shard) >= SHARD_DOCS:
            flush()
    flush()
    return staged


def chunk_docs(
    batch: dict[str, np.ndarray], chunk_words: int, overlap_words: int, chunk_chars: int
) -> dict[str, np.ndarray]:
    """Ray Data stage: documents → one row per chunk (document fields on its first chunk)."""
    out: dict[str, list[Any]] = {
        k: [] for k in ("doc_id", "index", "count", "chunk", "title", "text", "metadata")
    }
    for doc_id, title, text, metadata in zip(
        batch["id"], batch["title"], batch["text"], batch["metadata"]
    ):
        pieces = chunk_text(str(text), chunk_words, overlap_words, chunk_chars)
        for i, piece in enumerate(pieces):
            out["doc_id"].append(doc_id)
            out["index"].append(i)
            out["count"].append(len(pieces))
            out["chunk"].append(piece)
            out["title"].append(title)
            # The document's own text and metadata travel once, with its first chunk.
            out["text"].append(text if i == 0 else "")
            out["metadata"].append(metadata if i == 0 else "")
    return {
        k: np.asarray(v, dtype=np.int64 if k in ("index", "count") else object)
        for k, v in out.items()
    }


class EmbedChunks:
    """Ray Data stage run by a pool of actors, each loading the embedder once."""

    def __init__(self, model_dir: str | None, batch_size: int, device: str, threads: int) -> None:
        import torch

        # As many threads as CPUs the actor holds: torch's default (every core) makes actors
        # sharing a node fight over them.
        torch.set_num_threads(max(1, threads))
        self.embedder = Embedder(model_dir, batch_size, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["vector"] = self.embedder.encode([str(t) for t in batch["chunk"]])
        return batch


class SegmentWriter:
    """Gathers chunk rows into whole documents and publishes them in segments."""

    def __init__(
        self, store: IndexStore, segment_chunks: int, result: BulkResult, progress: Progress
    ) -> None:
        self.store = store
        self.segment_chunks = segment_chunks
        self.result = result
        self.progress = progress
        self.partial: dict[str, dict[str, Any]] = {}
        self.docs: list[DocRecord] = []
        self.chunks: list[ChunkRecord] = []
        self.vectors: list[np.ndarray] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for row in range(len(batch["doc_id"])):
            doc_id = str(batch["doc_id"][row])
            entry = self.partial.setdefault(doc_id, {"pieces": {}, "vectors": {}})
            i = int(batch["index"][row])
            entry["count"] = int(batch["count"][row])
            entry["pieces"][i] = str(batch["chunk"][row])
            entry["vectors"][i] = batch["vector"][row]
            entry["title"] = str(batch["title"][row])
            if i == 0:
                entry["text"] = str(batch["text"][row])
                entry["metadata"] = json.loads(str(batch["metadata"][row]))
            if len(entry["pieces"]) == entry["count"]:
                self._complete(doc_id, self.partial.pop(doc_id))
                if len(self.chunks) >= self.segment_chunks:
                    self.flush()

    def _complete(self, doc_id: str, entry: dict[str, Any]) -> None:
        n = entry["count"]
        record, chunks = document_records(
            doc_id,
            entry["title"],
            entry["text"],
            entry["metadata"],
            [entry["pieces"][i] for i in range(n)],
        )
        self.docs.append(record)
        self.chunks.extend(chunks)
        self.vectors.append(np.stack([entry["vectors"][i] for i in range(n)]))

    def flush(self) -> None:
        if not self.docs:
            return
        self.result.version = self.store.add_embedded(
            self.docs, self.chunks, np.concatenate(self.vectors).astype(np.float32)
        )
        self.result.documents += len(self.docs)
        self.result.chunks += len(self.chunks)
        self.result.segments += 1
        self.progress.published(self.result.documents, self.result.chunks)
        self.docs, self.chunks, self.vectors = [], [], []


def embed_workers(requested: int | None, gpus: float) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each): one actor a GPU where the cluster has GPUs, else one a CPU,
    leaving half a CPU for the read and chunk tasks (a quarter each): a pool holding every CPU
    starves its own input and the job hangs (seen on 2 cores). `requested` is capped alike."""
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    fits = max(1, int(free - 2 * STAGE_CPUS))
    cpus = 1.0 if free >= 1 + 2 * STAGE_CPUS else max(free - 2 * STAGE_CPUS, 0.0)
    if gpus >= 1:
        return min(requested or int(gpus), int(gpus), fits), cpus, 1.0
    return min(requested or fits, fits), cpus, 0.0


def run(
    cfg: HybridServeConfig,
    paths: Sequence[Path],
    fields: FieldNames = FieldNames(),
    workers: int | None = None,
    segment_chunks: int = 50_000,
    progress: Progress | None = None,
    store: IndexStore | None = None,
    connect: Callable[[], None] | None = None,
    collection: str = DEFAULT_COLLECTION,
) -> BulkResult:
    """The whole job, every document into `collection`. Safe to run again after any
    interruption. `connect` starts or joins Ray, called only when there is something to embed
    (Ray must be initialised otherwise)."""
    progress = progress or Progress()
    result = BulkResult()
    started = time.perf_counter()
    rc = cfg.retriever
    if store is None:
        embedder = Embedder(rc.embedding_model, rc.embed_batch_size, "cpu")
        store = IndexStore.from_config(cfg.index_dir, rc, embedder)
    store.refresh()
    jobs = Path(cfg.data_dir) / "ingest"
    jobs.mkdir(parents=True, exist_ok=True)
    with open(jobs / "LOCK", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another bulk ingestion is running on {cfg.data_dir}") from None
        for stale in jobs.glob("job-*"):  # staging of an interrupted run: re-derived below
            shutil.rmtree(stale, ignore_errors=True)
        folder = jobs / f"job-{uuid.uuid4().hex[:12]}"
        try:
            last = scan(paths, fields, result, collection)
            staged = stage(paths, fields, last, store, folder, result, progress, collection)
            if staged:
                if connect:
                    connect()
                _pipeline(cfg, folder, store, workers, segment_chunks, result, progress)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    while store.compact():
        pass
    result.version = store.version
    result.seconds = time.perf_counter() - started
    return result


def _pipeline(
    cfg: HybridServeConfig,
    folder: Path,
    store: IndexStore,
    workers: int | None,
    segment_chunks: int,
    result: BulkResult,
    progress: Progress,
) -> None:
    import ray
    import ray.data

    rc = cfg.retriever
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the front end draws one bar over published documents
    n, cpus, gpus = embed_workers(workers, ray.cluster_resources().get("GPU", 0.0))
    # `auto` is resolved by each actor: Ray shows it only the GPU it was given.
    result.workers, result.device = n, ("GPU" if gpus else "CPU")
    ds = (
        ray.data.read_parquet(str(folder), num_cpus=STAGE_CPUS)
        .map_batches(
            chunk_docs,  # type: ignore[arg-type]  # with fn_args, which Ray's annotation omits
            fn_args=(rc.chunk_words, rc.chunk_overlap_words, rc.chunk_chars),
            batch_size=256,
            batch_format="numpy",
            num_cpus=STAGE_CPUS,
        )
        .map_batches(
            EmbedChunks,
            fn_constructor_args=(rc.embedding_model, rc.embed_batch_size, rc.device, int(cpus)),
            batch_size=max(rc.embed_batch_size * 8, 256),
            batch_format="numpy",
            # A fixed pool: Ray Data's autoscaling did not grow a (1, n) pool on short inputs.
            compute=ray.data.ActorPoolStrategy(size=n),
            num_cpus=cpus,
            num_gpus=gpus,
        )
    )
    writer = SegmentWriter(store, segment_chunks, result, progress)
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        writer.add(batch)
    writer.flush()
    if writer.partial:
        raise RuntimeError(
            f"{len(writer.partial)} documents came back incomplete from the pipeline"
        )
