"""The persistent hybrid index: FAISS (dense) + BM25 over immutable segments, published atomically.

Layout under `root`:

    CURRENT                 name of the live manifest ("m00000007"), replaced atomically
    LOCK                    flock'ed by the one writer at a time (any replica, any process)
    COMPACT                 flock'ed by the one compaction at a time
    manifests/m00000007.json  the version's ordered list of segments, oldest first
    segments/seg-<id>/      one immutable segment (see `segment.py`)

A write (new, replaced or deleted documents) writes one new segment, holding the batch's records,
vectors and postings and, as tombstones, the ids it deletes from older segments; a replaced
document is shadowed by its newer copy. The segment is fsynced and renamed into place, then a
manifest listing it is written and fsynced, and only then does CURRENT point at it: a crash at
any moment leaves the old or the new version, never a half-indexed one, and a write is
acknowledged only after CURRENT is durable. A write costs the batch, not the index.

Compaction merges segments of one size class (and rewrites segments that are mostly tombstoned)
in the background, without holding up writes; it publishes the merged segment in the place of
its parts, so writes made meanwhile keep their precedence. Readers (every retriever replica)
serve the segments of one manifest and switch to a newer one when CURRENT changes, opening only
segments they have not opened yet; a restart loads the files, with no re-embedding.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_serve.config import RetrieverConfig
from hybrid_serve.retrieval.ann import ANNSpec
from hybrid_serve.retrieval.chunking import chunk_text
from hybrid_serve.retrieval.embedder import Embedder
from hybrid_serve.retrieval.fusion import reciprocal_rank_fusion
from hybrid_serve.retrieval.segment import (
    ChunkRecord,
    DocRecord,
    Postings,
    Segment,
    SegmentWriter,
    bm25_idf,
    bm25_tokenize,
    contains,
    doc_key,
    doc_tags,
    document_records,
    fsync_file,
    id_hashes,
    split_key,
    write_segment,
)
from hybrid_serve.schemas import DEFAULT_COLLECTION, Collections, Passage

__all__ = ["ChunkRecord", "DocRecord", "IndexStore", "IndexView", "NewDocument", "index_on_disk"]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 2  # segments carry their own format (segment.SEGMENT_FORMAT)


@dataclass
class NewDocument:
    """A document to ingest; `id` None means: derive it from the content (idempotent retries)."""

    text: str
    title: str = ""
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    collection: str = DEFAULT_COLLECTION

    def resolved_id(self) -> str:
        if self.id:
            return self.id
        digest = hashlib.sha256(f"{self.title}\x00{self.text}".encode()).hexdigest()
        return f"doc-{digest[:20]}"

    def key(self) -> str:
        """The stored key: the id within its collection (segment.doc_key)."""
        return doc_key(self.collection, self.resolved_id())


class IndexView:
    """One published version: its segments and which of their rows are live."""

    def __init__(self, version: int, segments: list[Segment]) -> None:
        self.version = version
        self.segments = segments
        n = len(segments)
        self.alive: list[np.ndarray | None] = [None] * n
        self.alive_bits: list[np.ndarray | None] = [None] * n
        self.doc_alive: list[np.ndarray | None] = [None] * n
        self.live_rows = [0] * n
        self.documents = 0
        # Ids added or deleted by newer segments shadow older copies (newest first).
        shadow = np.zeros(0, dtype=np.int64)
        for i in range(n - 1, -1, -1):
            seg = segments[i]
            docs_alive = ~contains(shadow, seg.doc_hash)
            rows_alive = ~contains(shadow, seg.row_doc)
            if not rows_alive.all():
                self.alive[i] = rows_alive
                self.alive_bits[i] = np.packbits(rows_alive, bitorder="little")
            if not docs_alive.all():
                self.doc_alive[i] = docs_alive
            self.live_rows[i] = int(rows_alive.sum())
            self.documents += int(docs_alive.sum())
            if i:
                shadow = np.union1d(shadow, np.union1d(seg.doc_hashes, seg.delete_hashes))
        self.chunks = sum(self.live_rows)
        # BM25 statistics over every row, tombstoned ones included until compaction drops them
        # (as Lucene's): a delete does not rescore the rest of the index.
        self.total_rows = sum(s.rows for s in segments)
        self.total_length = sum(s.total_length for s in segments)
        self._masks: dict[tuple[int, Collections], tuple[Any, Any]] = {}

    def searchable(self, i: int, collections: Collections) -> tuple[Any, Any] | None:
        """(live-row mask, its packed bits for FAISS) of segment `i` within `collections`, None
        when none of its rows are; (None, None) when all are. Cached per view: it is
        immutable, and a key asks with the same collections every time."""
        cached = self._masks.get((i, collections))
        if cached is not None:
            return cached
        readable = self.segments[i].readable_rows(collections)
        if readable is False:
            out = None
        elif readable is True:
            out = (self.alive[i], self.alive_bits[i])
        else:
            alive = readable if self.alive[i] is None else readable & self.alive[i]
            out = (alive, np.packbits(alive, bitorder="little"))
        if len(self._masks) >= 256:  # more distinct callers than that: start over
            self._masks.clear()
        self._masks[(i, collections)] = out  # type: ignore[assignment]
        return out

    def collections(self) -> list[str]:
        """Every collection a segment of this version holds rows of."""
        return sorted({c for s in self.segments for c in s.collections if s.rows})

    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    def dead_fraction(self, i: int) -> float:
        rows = self.segments[i].rows
        return 1 - self.live_rows[i] / rows if rows else 0.0

    def query_terms(self, query: str) -> dict[str, float]:
        """Query terms present in the index, weighted by global IDF (repeats count)."""
        if not self.total_rows:
            return {}
        out = {}
        for term, count in Counter(bm25_tokenize([query])[0]).items():
            df = sum(s.postings.df(term) for s in self.segments)
            if df:
                out[term] = count * bm25_idf(df, self.total_rows)
        return out


def index_on_disk(root: str | Path) -> dict[str, Any] | None:
    """The live manifest, checked for a supported format and its segments; None when no index
    was written yet. Reads no vectors: cheap for a diagnosis."""
    root = Path(root)
    try:
        name = (root / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None
    if _is_legacy(name):
        folder = root / "snapshots" / name
        manifest = json.loads((folder / "manifest.json").read_text())
        return {**manifest, "segments": 1, "note": "snapshot format 1: converted on next start"}
    manifest = json.loads((root / "manifests" / f"{name}.json").read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise RuntimeError(f"{name}: index format {manifest.get('format')} is not supported")
    missing = [
        s for s in manifest["segments"] if not (root / "segments" / s / "meta.json").exists()
    ]
    if missing:
        raise RuntimeError(f"{name}: missing segments {', '.join(missing)}")
    return {**manifest, "segments": len(manifest["segments"])}


class IndexStore:
    """Segmented hybrid index on disk, shared by every retriever replica that mounts `root`."""

    def __init__(
        self,
        root: str | Path,
        embed: Callable[[Sequence[str]], np.ndarray],
        dim: int,
        embedding_model: str = "",
        chunk_words: int = 180,
        chunk_overlap_words: int = 40,
        chunk_chars: int = 4000,
        keep_snapshots: int = 2,
        ann_spec: ANNSpec | None = None,
        merge_factor: int = 8,
    ) -> None:
        self.root = Path(root)
        self.ann_spec = ann_spec or ANNSpec()
        self.embed = embed
        self.dim = dim
        self.embedding_model = embedding_model
        self.chunk_words = chunk_words
        self.chunk_overlap_words = chunk_overlap_words
        self.chunk_chars = chunk_chars
        self.keep_snapshots = keep_snapshots
        self.merge_factor = merge_factor
        for sub in ("segments", "manifests"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._view: IndexView | None = None
        self._opened: dict[str, Segment] = {}
        self._current_stamp: tuple[int, int] | None = None
        self._thread_lock = threading.Lock()
        self._local = threading.local()  # .writing: this thread holds the writer lock

    @classmethod
    def from_config(cls, root: str | Path, rc: RetrieverConfig, embedder: Embedder) -> IndexStore:
        return cls(
            root,
            embed=embedder.encode,
            dim=embedder.dim,
            embedding_model=embedder.name,
            chunk_words=rc.chunk_words,
            chunk_overlap_words=rc.chunk_overlap_words,
            chunk_chars=rc.chunk_chars,
            keep_snapshots=rc.keep_snapshots,
            ann_spec=ANNSpec.from_config(rc),
            merge_factor=rc.merge_factor,
        )

    # -- reading -----------------------------------------------------------------------------

    @property
    def view(self) -> IndexView | None:
        return self._view

    @property
    def version(self) -> int:
        return self._view.version if self._view else 0

    def exists(self) -> bool:
        return (self.root / "CURRENT").is_file()

    def _read_current(self) -> str | None:
        try:
            return (self.root / "CURRENT").read_text().strip() or None
        except FileNotFoundError:
            return None

    def refresh(self) -> bool:
        """Load the version CURRENT names if it is not the one in memory. Cheap when unchanged."""
        try:
            st = (self.root / "CURRENT").stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._current_stamp and self._view is not None:
            return False
        for attempt in range(5):
            name = self._read_current()
            if name is None:
                return False
            if _is_legacy(name):
                if getattr(self._local, "writing", False):
                    self._convert_legacy(name)
                else:
                    with self._writer():
                        pass  # the writer converts it under the lock
                return True
            if self._view is not None and name == _manifest_name(self._view.version):
                self._current_stamp = stamp
                return False
            try:
                manifest = json.loads((self.root / "manifests" / f"{name}.json").read_text())
                view = self._open_view(manifest)
            except FileNotFoundError:
                # A writer collected it between our reads; CURRENT has moved on.
                time.sleep(0.05 * (attempt + 1))
                continue
            self._view = view
            self._current_stamp = stamp
            log.info(
                "loaded index %s (%d docs, %d chunks, %d segments)",
                name,
                view.documents,
                view.chunks,
                len(view.segments),
            )
            return True
        raise RuntimeError(f"could not load the index named by {self.root / 'CURRENT'}")

    def _open_view(self, manifest: dict[str, Any]) -> IndexView:
        if manifest.get("format") != MANIFEST_FORMAT:
            raise RuntimeError(f"index format {manifest.get('format')} is not supported")
        segments = []
        for name in manifest["segments"]:
            seg = self._opened.get(name)
            if seg is None:
                seg = Segment(self.root / "segments" / name, self.ann_spec)
                if seg.dim != self.dim:
                    raise RuntimeError(
                        f"index at {self.root} has {seg.dim}-d vectors, the embedder {self.dim}-d;"
                        " use another data_dir or rebuild the index"
                    )
            segments.append(seg)
        # Segments of older versions stay open only as long as a search still holds their view.
        self._opened = {s.name: s for s in segments}
        return IndexView(int(manifest["version"]), segments)

    def _live(
        self, doc_ids: Sequence[str], lookup: Callable[[Segment, list[str]], dict[str, Any]]
    ) -> dict[str, Any]:
        """`lookup` answers for each live id from the newest segment holding it; an id stops at
        the first newer segment that deletes it. Hash hits are confirmed by `lookup` itself."""
        view = self._view
        out: dict[str, Any] = {}
        pending = list(dict.fromkeys(doc_ids))
        for seg in reversed(view.segments if view else []):
            if not pending:
                break
            hashes = id_hashes(pending)
            present = contains(seg.doc_hashes, hashes)
            found = lookup(seg, [d for d, p in zip(pending, present) if p]) if present.any() else {}
            out.update(found)
            deleted = contains(seg.delete_hashes, hashes)
            pending = [d for d, x in zip(pending, deleted) if d not in found and not x]
        return out

    def get(self, doc_id: str) -> DocRecord | None:
        def lookup(seg: Segment, ids: list[str]) -> dict[str, DocRecord]:
            doc = seg.doc(ids[0])
            return {doc.id: doc} if doc else {}

        return self._live([doc_id], lookup).get(doc_id)

    def digests(self, doc_ids: Sequence[str]) -> dict[str, str]:
        """The content digest of each live document among `doc_ids` (absent ones left out)."""
        return self._live(doc_ids, lambda seg, ids: seg.digests(ids))

    def stats(self) -> dict[str, Any]:
        view = self._view
        return {
            "version": view.version if view else 0,
            "documents": view.documents if view else 0,
            "chunks": view.chunks if view else 0,
            "segments": len(view.segments) if view else 0,
            "embedding_model": self.embedding_model,
            "index_type": self.ann_spec.kind,
            "on_gpu": bool(
                self.ann_spec.gpu
                and view
                and any(
                    s.index_kind != "flat" and type(s.index).__name__.startswith("Gpu")
                    for s in view.segments
                )
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
        collections: Collections = None,
    ) -> list[Passage]:
        """Dense and BM25 hits from every segment, merged by score, fused by rank; only rows of
        `collections` (None: all) are searched, inside FAISS and BM25 alike, so a caller's
        top_k is full whatever other collections hold. BM25's statistics stay global (one
        ranking for every caller)."""
        view = self._view
        if view is None or not view.chunks:
            return []
        k = min(max(candidates, top_k), view.chunks)
        qvec = self.embed([query])
        dense: list[tuple[float, tuple[int, int]]] = []
        lexical: list[tuple[float, tuple[int, int]]] = []
        terms = view.query_terms(query)
        avgdl = view.total_length / view.total_rows
        for i, seg in enumerate(view.segments):
            masks = view.searchable(i, collections) if view.live_rows[i] else None
            if masks is None:
                continue
            alive, alive_bits = masks
            if alive is not None and not alive.any():
                continue
            scores, rows = seg.search_dense(qvec, k, alive_bits)
            dense.extend((float(s), (i, int(r))) for s, r in zip(scores, rows))
            if terms:
                scores, rows = seg.search_bm25(terms, avgdl, k, alive)
                lexical.extend((float(s), (i, int(r))) for s, r in zip(scores, rows))
        # Stable sorts: ties keep segment then row order, so results are deterministic.
        dense.sort(key=lambda h: -h[0])
        lexical.sort(key=lambda h: -h[0])
        cosine = {key: s for s, key in dense[:k]}
        bm25_score = {key: s for s, key in lexical[:k]}
        fused = reciprocal_rank_fusion(
            [[key for _, key in dense[:k]], [key for _, key in lexical[:k]]],
            k=rrf_k,
            weights=[dense_weight, bm25_weight],
        )[:top_k]
        by_segment: dict[int, list[int]] = {}
        for (i, row), _ in fused:
            by_segment.setdefault(i, []).append(row)
        records: dict[tuple[int, int], ChunkRecord] = {}
        for i, hit_rows in by_segment.items():
            seg = view.segments[i]
            for row, rec in zip(hit_rows, seg.chunks_at(hit_rows)):
                records[(i, row)] = rec
                # Cosine for every hit, BM25-only ones included: the confidence uses it.
                if (i, row) not in cosine:
                    cosine[(i, row)] = float(seg.vectors[row] @ qvec[0])
        out = []
        for key, score in fused:
            c = records[key]
            collection, doc_id = split_key(c.doc_id)
            out.append(
                Passage(
                    # the chunk's number after the id, as the document was given it
                    chunk_id=doc_id + c.chunk_id[len(c.doc_id) :],
                    doc_id=doc_id,
                    collection=collection,
                    title=c.title,
                    text=c.text,
                    score=float(score),
                    dense_score=cosine[key],
                    bm25_score=bm25_score.get(key),
                    tags=c.tags,
                )
            )
        return out

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """Exclusive across threads, processes and replicas sharing the folder."""
        with self._thread_lock, open(self.root / "LOCK", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._local.writing = True
            try:
                self.refresh()
                yield
            finally:
                self._local.writing = False
                fcntl.flock(lock, fcntl.LOCK_UN)

    def chunk(self, doc: NewDocument) -> list[str]:
        return chunk_text(doc.text, self.chunk_words, self.chunk_overlap_words, self.chunk_chars)

    def prepare(
        self, documents: Sequence[NewDocument]
    ) -> list[tuple[DocRecord, list[ChunkRecord]]]:
        """Records and chunks of a batch; the last copy of an id in one batch wins."""
        prepared: dict[str, tuple[DocRecord, list[ChunkRecord]]] = {}
        for doc in documents:
            key = doc.key()
            prepared.pop(key, None)
            prepared[key] = document_records(
                key, doc.title, doc.text, dict(doc.metadata), self.chunk(doc)
            )
        return list(prepared.values())

    def unchanged(self, records: Sequence[DocRecord]) -> set[str]:
        """Ids of records the index already holds with the same content."""
        digests = self.digests([r.id for r in records])
        return {r.id for r in records if digests.get(r.id) == r.digest()}

    def upsert(
        self,
        documents: Sequence[NewDocument],
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[int, list[str]]:
        """Add or replace documents; returns (new version, their ids within their collections).
        Durable when it returns."""
        prepared = self.prepare(documents)
        ids = [r.public_id for r, _ in prepared]
        # Unchanged documents are neither re-embedded nor re-versioned. Embedding, the slow part,
        # runs before the writer lock: one large document holds up no other writer.
        same = self.unchanged([r for r, _ in prepared])
        changed = [(r, c) for r, c in prepared if r.id not in same]
        vectors = self._embed_with_progress([c.text for _, cs in changed for c in cs], progress)
        with self._writer():
            # Another writer may have stored the same content meanwhile: nothing to publish.
            same = self.unchanged([r for r, _ in changed])
            keep = np.array([r.id not in same for r, cs in changed for _ in cs], dtype=bool)
            changed = [(r, c) for r, c in changed if r.id not in same]
            if not changed:
                return self.version, ids
            chunks = [c for _, cs in changed for c in cs]
            version = self._append([r for r, _ in changed], chunks, vectors[keep], deletes=())
            return version, ids

    def add_embedded(
        self, docs: Sequence[DocRecord], chunks: Sequence[ChunkRecord], vectors: np.ndarray
    ) -> int:
        """Publish documents chunked and embedded elsewhere (the bulk pipeline) as one segment,
        all or nothing; returns the new version."""
        with self._writer():
            return self._append(docs, chunks, vectors, deletes=())

    def delete(self, doc_ids: Iterable[str]) -> tuple[int, list[str]]:
        """Remove documents from dense and BM25 retrieval; returns (version, ids that existed)."""
        with self._writer():
            present = list(dict.fromkeys(d for d in doc_ids if self.get(d) is not None))
            if not present:
                return self.version, []
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return self._append([], [], empty, deletes=present), present

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

    def _append(
        self,
        docs: Sequence[DocRecord],
        chunks: Sequence[ChunkRecord],
        vectors: np.ndarray,
        deletes: Sequence[str],
    ) -> int:
        """One new segment on top of the live version (under the writer lock)."""
        tmp = self._build(
            lambda folder: write_segment(
                folder, docs, chunks, vectors, deletes, self.ann_spec, self.embedding_model
            )
        )
        names = self._view.names() if self._view else []
        return self._publish([*names, self._install(tmp)])

    @contextmanager
    def _building(self) -> Iterator[Path]:
        """A temporary segment folder, flock'ed while it is written so no collector removes it."""
        token = uuid.uuid4().hex
        segments = self.root / "segments"
        with open(segments / f".tmp-{token}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield segments / f".tmp-{token}"

    def _build(self, write: Callable[[Path], None]) -> Path:
        with self._building() as tmp:
            write(tmp)
        return tmp

    def _install(self, tmp: Path) -> str:
        """Rename a written segment into place (under the writer lock) and return its name."""
        name = f"seg-{uuid.uuid4().hex[:16]}"
        os.rename(tmp, self.root / "segments" / name)
        (tmp.parent / f"{tmp.name}.lock").unlink(missing_ok=True)
        fsync_file(self.root / "segments")
        return name

    def _publish(self, names: list[str], version: int | None = None) -> int:
        """Point CURRENT at a new manifest of `names` (under the writer lock); durable on return."""
        version = self.version + 1 if version is None else version
        view = self._open_view({"format": MANIFEST_FORMAT, "version": version, "segments": names})
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": version,
            "created": time.time(),
            "segments": names,
            "documents": view.documents,
            "chunks": view.chunks,
            "dim": self.dim,
            "embedding_model": self.embedding_model,
        }
        manifests = self.root / "manifests"
        tmp = manifests / f".tmp-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(manifest, indent=2))
        fsync_file(tmp)
        os.replace(tmp, manifests / f"{_manifest_name(version)}.json")
        fsync_file(manifests)
        current_tmp = self.root / f".CURRENT.{uuid.uuid4().hex}"
        current_tmp.write_text(_manifest_name(version) + "\n")
        fsync_file(current_tmp)
        os.replace(current_tmp, self.root / "CURRENT")
        fsync_file(self.root)
        self._view = view
        st = (self.root / "CURRENT").stat()
        self._current_stamp = (st.st_mtime_ns, st.st_ino)
        self._collect_garbage(version)
        return version

    def _collect_garbage(self, live: int) -> None:
        """Drop manifests older than the kept versions, segments none of them lists, and what
        crashed writers left (unlocked temporary folders, manifests never made CURRENT)."""
        manifests = self.root / "manifests"
        kept: set[str] = set()
        for entry in list(manifests.iterdir()):
            if entry.name.startswith(".tmp-"):
                entry.unlink(missing_ok=True)
                continue
            if not (entry.name.startswith("m") and entry.suffix == ".json"):
                continue
            version = int(entry.stem[1:])
            if live - self.keep_snapshots <= version <= live:
                kept.update(json.loads(entry.read_text())["segments"])
            else:
                entry.unlink(missing_ok=True)
        segments = self.root / "segments"
        for entry in list(segments.iterdir()):
            if entry.name.startswith(".tmp-"):
                folder = segments / entry.name.removesuffix(".lock")
                lock_path = segments / f"{folder.name}.lock"
                with open(lock_path, "a+") as lock:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # being written by a live compaction
                    shutil.rmtree(folder, ignore_errors=True)
                    lock_path.unlink(missing_ok=True)
            elif entry.is_dir() and not entry.name.startswith(".") and entry.name not in kept:
                shutil.rmtree(entry, ignore_errors=True)
        for entry in self.root.glob(".CURRENT.*"):
            entry.unlink(missing_ok=True)

    # -- compaction --------------------------------------------------------------------------

    def compaction_plan(self, force: bool = False) -> tuple[int, int] | None:
        """The run of segments [start, end) to merge next, or None.

        Tiered, as log-structured stores merge: a run of `merge_factor` consecutive segments of
        one size class (log base `merge_factor` of live chunks) becomes one segment of the next
        class, so each chunk is rewritten about log(N) times; a segment mostly tombstoned is
        rewritten alone. `force` merges everything into one."""
        view = self._view
        if view is None:
            return None
        n = len(view.segments)
        if force:
            return (0, n) if n > 1 or (n == 1 and view.dead_fraction(0) > 0) else None
        for i in range(n):
            if view.dead_fraction(i) >= 0.5:
                return (i, i + 1)
        classes = [int(math.log(max(rows, 1), self.merge_factor)) for rows in view.live_rows]
        end = n
        while end > 0:
            start = end - 1
            while start > 0 and classes[start - 1] == classes[end - 1]:
                start -= 1
            if end - start >= self.merge_factor:
                return (end - self.merge_factor, end)
            end = start
        return None

    def compact(self, force: bool = False) -> bool:
        """Merge one run of segments if the policy (or `force`) asks; True when one was merged.
        Writes continue meanwhile: only the final publish takes the writer lock."""
        with open(self.root / "COMPACT", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another process is compacting
            self.refresh()
            plan = self.compaction_plan(force)
            view = self._view
            if plan is None or view is None:
                return False
            start, end = plan
            run = view.segments[start:end]
            started = time.perf_counter()
            with self._building() as tmp:
                self._write_merged(tmp, view, start, end)
                with self._writer():
                    names = self._view.names() if self._view else []
                    run_names = [s.name for s in run]
                    at = names.index(run_names[0]) if run_names[0] in names else -1
                    if at < 0 or names[at : at + len(run)] != run_names:
                        # Another process merged these meanwhile: ours is dropped unpublished.
                        shutil.rmtree(tmp, ignore_errors=True)
                        tmp.with_name(f"{tmp.name}.lock").unlink(missing_ok=True)
                        return False
                    merged = self._install(tmp)
                    version = self._publish([*names[:at], merged, *names[at + len(run) :]])
            log.info(
                "compacted %d segments (%d live chunks) into %s in %.1f s: version %d",
                len(run),
                sum(view.live_rows[start:end]),
                merged,
                time.perf_counter() - started,
                version,
            )
            return True

    def _write_merged(self, folder: Path, view: IndexView, start: int, end: int) -> None:
        """The live records of segments [start, end) as one segment, streamed: records a page
        at a time, vectors a block at a time into the new segment's memory-mapped file."""
        parts = view.segments[start:end]
        keeps = []
        for i, seg in zip(range(start, end), parts):
            alive = view.alive[i]
            keeps.append(alive if alive is not None else np.ones(seg.rows, dtype=bool))
        writer = SegmentWriter(folder, self.dim, self.ann_spec, self.embedding_model)
        for i, seg in zip(range(start, end), parts):
            doc_keep = view.doc_alive[i]
            writer.add_docs(
                d for j, d in enumerate(seg.iter_docs()) if doc_keep is None or doc_keep[j]
            )
        for seg, keep in zip(parts, keeps):
            writer.add_chunks(c for c, k in zip(seg.iter_chunks(), keep) if k)
        out = writer.vectors_file()
        at = 0
        block = 8192
        for seg, keep in zip(parts, keeps):
            for lo in range(0, seg.rows, block):
                rows = np.flatnonzero(keep[lo : lo + block]) + lo
                out[at : at + len(rows)] = seg.vectors[rows]
                at += len(rows)
        deletes: set[str] = set()
        if start > 0:  # at the oldest segment nothing older is left to delete from
            for seg in parts:
                deletes.update(seg.deletes)
        writer.finish(Postings.merge(list(zip((s.postings for s in parts), keeps))), deletes)

    # -- the snapshot format of earlier releases ---------------------------------------------

    def _convert_legacy(self, name: str) -> None:
        """A format-1 snapshot (one folder per version) becomes one segment, its vectors read
        back from FAISS: upgrading does not re-embed. Under the writer lock."""
        import faiss

        folder = self.root / "snapshots" / name
        with open(folder / "docs.jsonl", encoding="utf-8") as f:
            docs = [DocRecord(**json.loads(line)) for line in f]
        tags = {d.id: doc_tags(d.metadata) for d in docs}
        with open(folder / "chunks.jsonl", encoding="utf-8") as f:
            chunks = [ChunkRecord(**json.loads(line)) for line in f]
        for c in chunks:
            c.tags = tags.get(c.doc_id, [])
        dense = faiss.read_index(str(folder / "dense.faiss"))
        vectors = (
            dense.reconstruct_n(0, dense.ntotal)
            if dense.ntotal
            else np.zeros((0, dense.d), dtype=np.float32)
        )
        log.info("converting index snapshot %s (%d chunks) to segments", name, len(chunks))
        tmp = self._build(
            lambda f: write_segment(
                f, docs, chunks, vectors, (), self.ann_spec, self.embedding_model
            )
        )
        self._publish([self._install(tmp)], version=int(name[1:]))
        shutil.rmtree(self.root / "snapshots", ignore_errors=True)


def _is_legacy(name: str) -> bool:
    return name.startswith("v") and name[1:].isdigit()


def _manifest_name(version: int) -> str:
    return f"m{version:08d}"
