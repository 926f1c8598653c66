"""The persistent hybrid index: FAISS (dense) + BM25 (bm25s), as immutable versioned snapshots.

Layout under `root`:

    CURRENT                 name of the live snapshot ("v00000007"), replaced atomically
    LOCK                    flock'ed by the one writer at a time (any replica, any process)
    snapshots/v00000007/    manifest.json, docs.jsonl, chunks.jsonl, dense.faiss, bm25/

A write builds a complete new snapshot in a temporary folder, fsyncs it, renames it into place
and only then points CURRENT at it: a crash at any moment leaves either the old or the new
version, never a half-indexed one. A write is acknowledged only after CURRENT is durable.
Readers (every retriever replica) serve an in-memory copy of one snapshot and switch to a newer
one when CURRENT changes; a restart loads the files, with no re-embedding or re-indexing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_serve.config import RetrieverConfig
from hybrid_serve.retrieval import ann
from hybrid_serve.retrieval.ann import ANNSpec
from hybrid_serve.retrieval.chunking import chunk_text
from hybrid_serve.retrieval.embedder import Embedder
from hybrid_serve.retrieval.fusion import reciprocal_rank_fusion
from hybrid_serve.schemas import Passage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class DocRecord:
    id: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    chunk_ids: list[str] = field(default_factory=list)


@dataclass
class ChunkRecord:
    chunk_id: str
    doc_id: str
    title: str
    text: str


@dataclass
class NewDocument:
    """A document to ingest; `id` None means: derive it from the content (idempotent retries)."""

    text: str
    title: str = ""
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def resolved_id(self) -> str:
        if self.id:
            return self.id
        digest = hashlib.sha256(f"{self.title}\x00{self.text}".encode()).hexdigest()
        return f"doc-{digest[:20]}"


def bm25_tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class Snapshot:
    """One immutable index version, fully in memory."""

    def __init__(
        self,
        version: int,
        docs: dict[str, DocRecord],
        chunks: list[ChunkRecord],
        vectors: np.ndarray,
        bm25: Any | None = None,
        dense: Any | None = None,
        embedding_model: str = "",
        spec: ANNSpec | None = None,
        search_index: Any | None = None,
    ) -> None:
        import faiss

        self.version = version
        self.docs = docs
        self.chunks = chunks
        self.embedding_model = embedding_model
        self.dim = int(vectors.shape[1])
        if dense is None:
            dense = faiss.IndexFlatIP(self.dim)
            if len(vectors):
                dense.add(vectors)
        self.dense = dense
        if bm25 is None and chunks:
            import bm25s

            bm25 = bm25s.BM25()
            bm25.index(bm25_tokenize([f"{c.title}\n{c.text}" for c in chunks]), show_progress=False)
        self.bm25 = bm25
        # `dense` (flat) is the record of every vector; `search_index` is what queries use.
        self.spec = spec or ANNSpec()
        if search_index is None and self.spec.kind != "flat":
            search_index = ann.build(self.vectors(), self.spec)
        self.built_index = search_index  # the CPU form, as saved
        self.search_index = ann.to_device(
            ann.tune(search_index, self.spec) if search_index is not None else dense, self.spec
        )

    def vectors(self) -> np.ndarray:
        n = self.dense.ntotal
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.dense.reconstruct_n(0, n)

    def vectors_at(self, rows: Sequence[int]) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.vstack([self.dense.reconstruct(int(i)) for i in rows])

    # -- persistence -------------------------------------------------------------------------

    def write(self, folder: Path) -> None:
        import faiss

        folder.mkdir(parents=True)
        with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
            for d in self.docs.values():
                f.write(json.dumps(asdict(d), ensure_ascii=False) + "\n")
        with open(folder / "chunks.jsonl", "w", encoding="utf-8") as f:
            for c in self.chunks:
                f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
        faiss.write_index(self.dense, str(folder / "dense.faiss"))
        if self.built_index is not None:
            faiss.write_index(self.built_index, str(folder / f"ann-{self.spec.kind}.faiss"))
        if self.bm25 is not None:
            self.bm25.save(str(folder / "bm25"), show_progress=False)
        manifest = {
            "format": FORMAT_VERSION,
            "version": self.version,
            "created": time.time(),
            "documents": len(self.docs),
            "chunks": len(self.chunks),
            "dim": self.dim,
            "embedding_model": self.embedding_model,
            "ann": self.spec.key() if self.built_index is not None else None,
        }
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _fsync_tree(folder)

    @classmethod
    def read(cls, folder: Path, spec: ANNSpec | None = None) -> Snapshot:
        import bm25s
        import faiss

        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise RuntimeError(f"{folder}: index format {manifest.get('format')} is not supported")
        docs: dict[str, DocRecord] = {}
        with open(folder / "docs.jsonl", encoding="utf-8") as f:
            for line in f:
                d = DocRecord(**json.loads(line))
                docs[d.id] = d
        with open(folder / "chunks.jsonl", encoding="utf-8") as f:
            chunks = [ChunkRecord(**json.loads(line)) for line in f]
        dense = faiss.read_index(str(folder / "dense.faiss"))
        bm25 = None
        if (folder / "bm25").is_dir():
            bm25 = bm25s.BM25.load(str(folder / "bm25"), show_progress=False)
        if dense.ntotal != len(chunks):
            raise RuntimeError(f"{folder}: {dense.ntotal} vectors for {len(chunks)} chunks")
        spec = spec or ANNSpec()
        search_index = None
        saved = folder / f"ann-{spec.kind}.faiss"
        if spec.kind != "flat" and manifest.get("ann") == spec.key() and saved.is_file():
            search_index = faiss.read_index(str(saved))
        elif spec.kind != "flat":
            log.info(
                "%s: building the %s index (not saved with these parameters)", folder, spec.kind
            )
        return cls(
            version=int(manifest["version"]),
            docs=docs,
            chunks=chunks,
            vectors=np.zeros((0, int(manifest["dim"])), dtype=np.float32),
            bm25=bm25,
            dense=dense,
            embedding_model=manifest.get("embedding_model", ""),
            spec=spec,
            search_index=search_index,
        )


def index_on_disk(root: str | Path) -> dict[str, Any] | None:
    """The live snapshot's manifest, checked for a supported format and its files; None when no
    index was written yet. Reads no vectors: cheap for a diagnosis."""
    root = Path(root)
    try:
        name = (root / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None
    folder = root / "snapshots" / name
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise RuntimeError(f"{folder}: index format {manifest.get('format')} is not supported")
    needed = ("docs.jsonl", "chunks.jsonl", "dense.faiss")
    missing = [f for f in needed if not (folder / f).exists()]
    if missing:
        raise RuntimeError(f"{folder}: missing {', '.join(missing)}")
    return manifest


class IndexStore:
    """Versioned hybrid index on disk, shared by every retriever replica that mounts `root`."""

    def __init__(
        self,
        root: str | Path,
        embed: Callable[[Sequence[str]], np.ndarray],
        dim: int,
        embedding_model: str = "",
        chunk_words: int = 180,
        chunk_overlap_words: int = 40,
        keep_snapshots: int = 2,
        ann_spec: ANNSpec | None = None,
    ) -> None:
        self.root = Path(root)
        self.ann_spec = ann_spec or ANNSpec()
        self.embed = embed
        self.dim = dim
        self.embedding_model = embedding_model
        self.chunk_words = chunk_words
        self.chunk_overlap_words = chunk_overlap_words
        self.keep_snapshots = keep_snapshots
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        self._snap: Snapshot | None = None
        self._current_stamp: tuple[int, int] | None = None
        self._thread_lock = threading.Lock()

    @classmethod
    def from_config(cls, root: str | Path, rc: RetrieverConfig, embedder: Embedder) -> IndexStore:
        return cls(
            root,
            embed=embedder.encode,
            dim=embedder.dim,
            embedding_model=embedder.name,
            chunk_words=rc.chunk_words,
            chunk_overlap_words=rc.chunk_overlap_words,
            keep_snapshots=rc.keep_snapshots,
            ann_spec=ANNSpec.from_config(rc),
        )

    # -- reading -----------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snap

    @property
    def version(self) -> int:
        return self._snap.version if self._snap else 0

    def exists(self) -> bool:
        return (self.root / "CURRENT").is_file()

    def _read_current(self) -> str | None:
        try:
            return (self.root / "CURRENT").read_text().strip() or None
        except FileNotFoundError:
            return None

    def refresh(self) -> bool:
        """Load the snapshot CURRENT names if it is not the one in memory. Cheap when unchanged."""
        try:
            st = (self.root / "CURRENT").stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._current_stamp and self._snap is not None:
            return False
        for attempt in range(5):
            name = self._read_current()
            if name is None:
                return False
            if self._snap is not None and name == _version_name(self._snap.version):
                self._current_stamp = stamp
                return False
            try:
                snap = Snapshot.read(self.root / "snapshots" / name, self.ann_spec)
            except FileNotFoundError:
                # A writer garbage-collected it between our reads; CURRENT has moved on.
                time.sleep(0.05 * (attempt + 1))
                continue
            if snap.dim != self.dim:
                raise RuntimeError(
                    f"index at {self.root} has {snap.dim}-d vectors, the embedder {self.dim}-d; "
                    "use another data_dir or rebuild the index"
                )
            self._snap = snap
            self._current_stamp = stamp
            log.info("loaded index %s (%d docs, %d chunks)", name, len(snap.docs), len(snap.chunks))
            return True
        raise RuntimeError(f"could not load the index named by {self.root / 'CURRENT'}")

    def get(self, doc_id: str) -> DocRecord | None:
        return self._snap.docs.get(doc_id) if self._snap else None

    def stats(self) -> dict[str, Any]:
        snap = self._snap
        return {
            "version": snap.version if snap else 0,
            "documents": len(snap.docs) if snap else 0,
            "chunks": len(snap.chunks) if snap else 0,
            "embedding_model": self.embedding_model,
            "index_type": self.ann_spec.kind,
            "on_gpu": bool(
                snap and snap.search_index is not snap.built_index and self.ann_spec.gpu
            ),
        }

    def search(
        self,
        query: str,
        top_k: int = 5,
        candidates: int = 50,
        rrf_k: int = 5,
        dense_weight: float = 0.8,
        bm25_weight: float = 1.0,
    ) -> list[Passage]:
        snap = self._snap
        if snap is None or not snap.chunks:
            return []
        n = len(snap.chunks)
        k = min(max(candidates, top_k), n)
        qvec = self.embed([query])
        dense_scores, dense_ids = snap.search_index.search(qvec, k)
        dense_rank = [int(i) for i in dense_ids[0] if i >= 0]
        bm25_rank: list[int] = []
        bm25_score: dict[int, float] = {}
        if snap.bm25 is not None:
            vocab = snap.bm25.vocab_dict
            tokens = [t for t in bm25_tokenize([query])[0] if t in vocab]
            if tokens:
                ids, scores = snap.bm25.retrieve([tokens], k=k, show_progress=False, n_threads=0)
                for i, s in zip(ids[0], scores[0]):
                    if s > 0:
                        bm25_rank.append(int(i))
                        bm25_score[int(i)] = float(s)
        fused = reciprocal_rank_fusion(
            [dense_rank, bm25_rank], k=rrf_k, weights=[dense_weight, bm25_weight]
        )[:top_k]
        rows = [int(i) for i, _ in fused]
        # Cosine for every hit, BM25-only ones included: the confidence uses it.
        cosine = snap.vectors_at(rows) @ qvec[0]
        out = []
        for pos, (row, score) in enumerate(zip(rows, (s for _, s in fused))):
            c = snap.chunks[row]
            out.append(
                Passage(
                    chunk_id=c.chunk_id,
                    doc_id=c.doc_id,
                    title=c.title,
                    text=c.text,
                    score=float(score),
                    dense_score=float(cosine[pos]),
                    bm25_score=bm25_score.get(row),
                    tags=_tags(snap.docs.get(c.doc_id)),
                )
            )
        return out

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """Exclusive across threads, processes and replicas sharing the folder."""
        with self._thread_lock, open(self.root / "LOCK", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.refresh()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def chunk(self, doc: NewDocument) -> list[str]:
        return chunk_text(doc.text, self.chunk_words, self.chunk_overlap_words)

    def upsert(
        self,
        documents: Sequence[NewDocument],
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[int, list[str]]:
        """Add or replace documents; returns (new version, ids). Durable when it returns."""
        prepared: list[tuple[DocRecord, list[ChunkRecord]]] = []
        seen: dict[str, int] = {}
        for doc in documents:
            doc_id = doc.resolved_id()
            record = DocRecord(
                id=doc_id, title=doc.title, text=doc.text, metadata=dict(doc.metadata)
            )
            pieces = self.chunk(doc)
            chunks = [
                ChunkRecord(chunk_id=f"{doc_id}#{i}", doc_id=doc_id, title=doc.title, text=t)
                for i, t in enumerate(pieces)
            ]
            record.chunk_ids = [c.chunk_id for c in chunks]
            if doc_id in seen:  # the last copy of an id in one batch wins
                prepared[seen[doc_id]] = (record, chunks)
            else:
                seen[doc_id] = len(prepared)
                prepared.append((record, chunks))
        ids = [r.id for r, _ in prepared]

        with self._writer():
            current = self._snap
            # Unchanged documents are neither re-embedded nor re-versioned.
            changed = [
                (r, c)
                for r, c in prepared
                if current is None
                or r.id not in current.docs
                or _doc_key(current.docs[r.id]) != _doc_key(r)
            ]
            if not changed and current is not None:
                return current.version, ids
            texts = [c.text for _, cs in changed for c in cs]
            vectors = self._embed_with_progress(texts, progress)
            replaced = {r.id for r, _ in changed}
            snap = self._next_snapshot(
                drop=replaced,
                add_docs=[r for r, _ in changed],
                add_chunks=[c for _, cs in changed for c in cs],
                add_vectors=vectors,
            )
            self._commit(snap)
            return snap.version, ids

    def delete(self, doc_ids: Iterable[str]) -> tuple[int, list[str]]:
        """Remove documents from dense and BM25 retrieval; returns (version, ids that existed)."""
        with self._writer():
            current = self._snap
            present = [d for d in doc_ids if current is not None and d in current.docs]
            if not present:
                return self.version, []
            snap = self._next_snapshot(
                drop=set(present),
                add_docs=[],
                add_chunks=[],
                add_vectors=np.zeros((0, self.dim), dtype=np.float32),
            )
            self._commit(snap)
            return snap.version, present

    def _embed_with_progress(
        self, texts: Sequence[str], progress: Callable[[int, int], None] | None
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        step = 64
        for start in range(0, len(texts), step):
            out.append(self.embed(texts[start : start + step]))
            if progress:
                progress(min(start + step, len(texts)), len(texts))
        return np.concatenate(out)

    def _next_snapshot(
        self,
        drop: set[str],
        add_docs: list[DocRecord],
        add_chunks: list[ChunkRecord],
        add_vectors: np.ndarray,
    ) -> Snapshot:
        current = self._snap
        docs: dict[str, DocRecord] = {}
        chunks: list[ChunkRecord] = []
        vectors = np.zeros((0, self.dim), dtype=np.float32)
        if current is not None:
            docs = {k: v for k, v in current.docs.items() if k not in drop}
            keep = [i for i, c in enumerate(current.chunks) if c.doc_id not in drop]
            chunks = [current.chunks[i] for i in keep]
            if keep:
                vectors = current.vectors()[keep]
        for d in add_docs:
            docs[d.id] = d
        chunks.extend(add_chunks)
        vectors = np.concatenate([vectors, add_vectors]) if len(add_vectors) else vectors
        return Snapshot(
            version=self.version + 1,
            docs=docs,
            chunks=chunks,
            vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            embedding_model=self.embedding_model,
            spec=self.ann_spec,
        )

    def _commit(self, snap: Snapshot) -> None:
        snapshots = self.root / "snapshots"
        tmp = snapshots / f".tmp-{uuid.uuid4().hex}"
        final = snapshots / _version_name(snap.version)
        snap.write(tmp)
        if final.exists():  # left by a crash after rename, before CURRENT moved: never live
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(snapshots)
        current_tmp = self.root / f".CURRENT.{uuid.uuid4().hex}"
        current_tmp.write_text(_version_name(snap.version) + "\n")
        _fsync_file(current_tmp)
        os.replace(current_tmp, self.root / "CURRENT")
        _fsync_dir(self.root)
        self._snap = snap
        st = (self.root / "CURRENT").stat()
        self._current_stamp = (st.st_mtime_ns, st.st_ino)
        self._collect_garbage(snap.version)

    def _collect_garbage(self, live: int) -> None:
        snapshots = self.root / "snapshots"
        for entry in snapshots.iterdir():
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith("v") and entry.name[1:].isdigit():
                if (
                    int(entry.name[1:]) <= live - self.keep_snapshots - 1
                    or int(entry.name[1:]) > live
                ):
                    shutil.rmtree(entry, ignore_errors=True)
        for entry in self.root.glob(".CURRENT.*"):
            entry.unlink(missing_ok=True)


def _tags(doc: DocRecord | None) -> list[str]:
    raw = doc.metadata.get("tags") if doc else None
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        return [str(t) for t in raw]
    return []


def _doc_key(d: DocRecord) -> tuple[str, str, str]:
    return (d.title, d.text, json.dumps(d.metadata, sort_keys=True))


def _version_name(version: int) -> str:
    return f"v{version:08d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))
