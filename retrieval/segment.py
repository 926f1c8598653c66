"""One immutable segment of the index: records, vectors, BM25 postings and a dense search index.

Files in `segments/<name>/`, written once into a temporary folder, fsynced, then renamed:

    meta.json        counts, dim, embedding model, the parameters of the saved ANN index
    records.sqlite   docs(id, title, text, metadata, chunk_ids, digest, tags) and
                     chunks(row, chunk_id, doc_id, text): a document's title and tags are stored
                     once, with the document, and joined onto the chunks a search returns
    vectors.npy      float32 [rows, dim], unit length: the record of every vector, memory-mapped
    postings.npz     BM25 term frequencies, chunks x terms (CSC); terms.json the vocabulary;
                     lengths.npy the tokens of each chunk
    deletes.json     ids of documents this segment removes from *older* segments (tombstones)
    ann-<kind>.faiss the approximate index, for segments large enough to want one

Segments are written by `SegmentWriter`, which streams records into SQLite and vectors into a
memory-mapped file: compaction never holds the texts or vectors of the segments it merges.

Records live in SQLite, not in memory: a replica holds per chunk only its vector (or, with
`ivf_pq`, its code), its BM25 postings and an 8-byte hash of its document id.

BM25 is scored here rather than by bm25s, which bakes each corpus's IDF into its index: scores
from segments indexed apart would not be comparable. Keeping term frequencies and scoring with
statistics summed over every segment (as Lucene does) gives the scores one index would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import sqlite3
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from hybrid_serve.retrieval import ann
from hybrid_serve.retrieval.ann import ANNSpec
from hybrid_serve.schemas import DEFAULT_COLLECTION

log = logging.getLogger(__name__)

# Format 3 stores titles and tags once per document; format 2 (a copy on every chunk) is read.
SEGMENT_FORMAT = 3
READABLE_SEGMENT_FORMATS = (2, 3)
# BM25 as Lucene (and bm25s's default "lucene" method) computes it.
BM25_K1 = 1.5
BM25_B = 0.75


# Documents are stored by key: the id alone in the default collection (so indexes written
# before collections existed read as they were), `<collection>\x1f<id>` in any other. Ids may
# not hold control characters (schemas.DocumentIn), so a key names one document of one
# collection, and the same id in two collections is two documents.
KEY_SEPARATOR = "\x1f"


def doc_key(collection: str, doc_id: str) -> str:
    return doc_id if collection == DEFAULT_COLLECTION else f"{collection}{KEY_SEPARATOR}{doc_id}"


def split_key(key: str) -> tuple[str, str]:
    """(collection, id) of a stored key."""
    collection, sep, doc_id = key.partition(KEY_SEPARATOR)
    return (collection, doc_id) if sep else (DEFAULT_COLLECTION, key)


@dataclass
class DocRecord:
    id: str  # the stored key (doc_key)
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    chunk_ids: list[str] = field(default_factory=list)

    @property
    def collection(self) -> str:
        return split_key(self.id)[0]

    @property
    def public_id(self) -> str:
        """The id the document was given (unique within its collection)."""
        return split_key(self.id)[1]

    def digest(self) -> str:
        """What decides whether a re-sent document changed (unchanged ones are not re-indexed)."""
        key = json.dumps([self.title, self.text, self.metadata], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class ChunkRecord:
    chunk_id: str
    doc_id: str
    title: str
    text: str
    tags: list[str] = field(default_factory=list)  # the document's, for policies on hits


def bm25_tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def id_hash(doc_id: str) -> int:
    """64 bits of a document id: what tombstones compare (a collision needs ~4e9 documents)."""
    return int.from_bytes(
        hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little", signed=True
    )


def id_hashes(doc_ids: Iterable[str]) -> np.ndarray:
    return np.fromiter((id_hash(d) for d in doc_ids), dtype=np.int64)


def contains(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Membership of `values` in a sorted array, vectorised."""
    if len(sorted_values) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_values, values).clip(0, len(sorted_values) - 1)
    return sorted_values[pos] == values


@dataclass
class Postings:
    """BM25 term frequencies of a segment's chunks."""

    matrix: sparse.csc_matrix  # rows = chunks, columns = terms, values = term frequency
    terms: dict[str, int]
    lengths: np.ndarray  # tokens per chunk, float32

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Postings:
        tokens = bm25_tokenize(texts)
        terms: dict[str, int] = {}
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        lengths = np.zeros(len(tokens), dtype=np.float32)
        for row, toks in enumerate(tokens):
            lengths[row] = len(toks)
            if not toks:
                continue
            ids = np.fromiter((terms.setdefault(t, len(terms)) for t in toks), dtype=np.int64)
            uniq, n = np.unique(ids, return_counts=True)
            rows.append(np.full(len(uniq), row, dtype=np.int64))
            cols.append(uniq)
            counts.append(n.astype(np.float32))
        return cls.from_triplets(rows, cols, counts, len(tokens), terms, lengths)

    @classmethod
    def from_triplets(
        cls,
        rows: list[np.ndarray],
        cols: list[np.ndarray],
        counts: list[np.ndarray],
        n_rows: int,
        terms: dict[str, int],
        lengths: np.ndarray,
    ) -> Postings:
        cat = lambda xs, t: np.concatenate(xs) if xs else np.zeros(0, dtype=t)  # noqa: E731
        matrix = sparse.csc_matrix(
            (cat(counts, np.float32), (cat(rows, np.int64), cat(cols, np.int64))),
            shape=(n_rows, len(terms)),
            dtype=np.float32,
        )
        return cls(matrix, terms, lengths)

    @classmethod
    def merge(cls, parts: Sequence[tuple[Postings, np.ndarray]]) -> Postings:
        """The postings of the kept rows (`keep`, a boolean mask) of several segments, stacked."""
        terms: dict[str, int] = {}
        blocks = []
        lengths = []
        for p, keep in parts:
            remap = np.fromiter(
                (terms.setdefault(t, len(terms)) for t in p.terms),
                dtype=np.int64,
                count=len(p.terms),
            )
            csr = p.matrix.tocsr()[keep]
            blocks.append((csr, remap))
            lengths.append(p.lengths[keep])
        out = []
        for csr, remap in blocks:
            coo = csr.tocoo()
            out.append(
                sparse.csr_matrix(
                    (coo.data, (coo.row, remap[coo.col] if len(remap) else coo.col)),
                    shape=(csr.shape[0], len(terms)),
                )
            )
        matrix = sparse.vstack(out, format="csc") if out else sparse.csc_matrix((0, 0))
        return cls(matrix.astype(np.float32), terms, np.concatenate(lengths).astype(np.float32))

    def df(self, term: str) -> int:
        col = self.terms.get(term)
        if col is None:
            return 0
        return int(self.matrix.indptr[col + 1] - self.matrix.indptr[col])

    def score(self, query_terms: dict[str, float], avgdl: float) -> np.ndarray:
        """BM25 of every chunk for terms weighted by their global IDF."""
        scores = np.zeros(self.matrix.shape[0], dtype=np.float32)
        indptr, indices, data = self.matrix.indptr, self.matrix.indices, self.matrix.data
        for term, idf in query_terms.items():
            col = self.terms.get(term)
            if col is None:
                continue
            rows = indices[indptr[col] : indptr[col + 1]]
            tf = data[indptr[col] : indptr[col + 1]]
            norm = BM25_K1 * ((1 - BM25_B) + BM25_B * self.lengths[rows] / avgdl)
            scores[rows] += idf * tf / (tf + norm)
        return scores


def document_records(
    doc_id: str, title: str, text: str, metadata: dict[str, Any], pieces: Sequence[str]
) -> tuple[DocRecord, list[ChunkRecord]]:
    """A document's record and its chunks' (ids `<doc>#<i>`, the document's tags on each): one
    builder for the server's writes and the bulk pipeline."""
    tags = doc_tags(metadata)
    chunks = [ChunkRecord(f"{doc_id}#{i}", doc_id, title, t, tags) for i, t in enumerate(pieces)]
    return DocRecord(doc_id, title, text, metadata, [c.chunk_id for c in chunks]), chunks


def doc_tags(metadata: dict[str, Any]) -> list[str]:
    raw = metadata.get("tags")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        return [str(t) for t in raw]
    return []


def bm25_idf(df: int, n: int) -> float:
    return float(np.log(1 + (n - df + 0.5) / (df + 0.5)))


class Segment:
    """An opened segment: searchable, immutable, shared by every index version that lists it."""

    def __init__(self, folder: Path, spec: ANNSpec) -> None:
        self.folder = folder
        self.name = folder.name
        self.meta = json.loads((folder / "meta.json").read_text())
        self.format = self.meta.get("format")
        if self.format not in READABLE_SEGMENT_FORMATS:
            raise RuntimeError(f"{folder}: segment format {self.meta.get('format')} not supported")
        self.rows = int(self.meta["chunks"])
        self.dim = int(self.meta["dim"])
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        if hasattr(self.vectors, "_mmap") and self.vectors._mmap is not None:
            # Re-ranking reads a few scattered rows: without this the kernel's read-ahead pulls
            # the whole file into memory over a few hundred queries.
            self.vectors._mmap.madvise(mmap.MADV_RANDOM)
        if self.vectors.shape != (self.rows, self.dim):
            raise RuntimeError(f"{folder}: {self.vectors.shape} vectors for {self.rows} chunks")
        loaded = np.load(folder / "postings.npz")
        self.postings = Postings(
            sparse.csc_matrix(
                (loaded["data"], loaded["indices"], loaded["indptr"]),
                shape=tuple(loaded["shape"]),
            ),
            json.loads((folder / "terms.json").read_text()),
            loaded["lengths"],
        )
        self.row_doc = loaded["row_doc"]
        # Segments written before collections existed hold the default collection only.
        self.collections: list[str] = self.meta.get("collections") or [DEFAULT_COLLECTION]
        self.row_collection = (
            loaded["row_collection"]
            if "row_collection" in loaded.files
            else np.zeros(self.rows, dtype=np.int32)
        )
        self.doc_hash = loaded["doc_hash"]  # of every document, in the order of the docs table
        self.doc_hashes = np.unique(self.doc_hash)
        self.total_length = float(self.postings.lengths.sum())
        self.docs = int(self.meta["documents"])
        self.deletes = json.loads((folder / "deletes.json").read_text())
        self.delete_hashes = np.unique(id_hashes(self.deletes))
        self._db = sqlite3.connect(
            f"file:{folder / 'records.sqlite'}?mode=ro&immutable=1",
            uri=True,
            check_same_thread=False,
        )
        self._db_lock = threading.Lock()
        self.spec = spec
        self.index, self.index_kind = self._search_index(spec)

    def readable_rows(self, collections: frozenset[str] | None) -> np.ndarray | bool:
        """Rows in `collections` (None: all): True for all of them, False for none, else a
        mask."""
        if collections is None:
            return True
        codes = [i for i, name in enumerate(self.collections) if name in collections]
        if len(codes) == len(self.collections):
            return True
        if not codes:
            return False
        return np.isin(self.row_collection, codes)

    def _search_index(self, spec: ANNSpec) -> tuple[Any, str]:
        import faiss

        kind = spec.kind if self.rows >= spec.min_rows_for(spec.kind) else "flat"
        if kind == "flat":
            index: Any = faiss.IndexFlatIP(self.dim)
            if self.rows:
                index.add(np.ascontiguousarray(self.vectors))
            return index, kind
        saved = self.folder / f"ann-{kind}.faiss"
        if self.meta.get("ann") == spec.key() and saved.is_file():
            index = faiss.read_index(str(saved))
        else:
            log.info("%s: building the %s index (not saved with these parameters)", self.name, kind)
            index = ann.build(np.ascontiguousarray(self.vectors), spec)
        return ann.to_device(ann.tune(index, spec), spec), kind

    # -- search ------------------------------------------------------------------------------

    def search_dense(
        self, query: np.ndarray, k: int, alive_bits: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(exact inner products, rows) of the best `k` live chunks, best first; `alive_bits`
        is the packed mask of live rows (None: all live)."""
        import faiss

        k = min(k, self.rows)
        if k == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        fetch = k * self.spec.refine_factor if self.index_kind == "ivf_pq" else k
        params = None
        if alive_bits is not None:
            selector = faiss.IDSelectorBitmap(self.rows, faiss.swig_ptr(alive_bits))
            params = ann.search_params(self.index, self.spec, selector)
        _, ids = self.index.search(query, min(fetch, self.rows), params=params)
        rows = np.sort(ids[0][ids[0] >= 0])
        # Exact scores from the vectors: comparable across segments and index kinds, and the
        # re-ranking that gives product quantisation back its recall.
        exact = (self.vectors[rows] @ query[0]).astype(np.float32)
        order = np.argsort(-exact, kind="stable")[:k]
        return exact[order], rows[order]

    def search_bm25(
        self, query_terms: dict[str, float], avgdl: float, k: int, alive: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if not query_terms or self.rows == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        scores = self.postings.score(query_terms, avgdl)
        if alive is not None:
            scores[~alive] = 0
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:
            hits = hits[np.argpartition(-scores[hits], k - 1)[:k]]
        order = np.lexsort((hits, -scores[hits]))
        return scores[hits][order], hits[order]

    # -- records -----------------------------------------------------------------------------

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    def _chunk_columns(self) -> str:
        """row, chunk_id, doc_id, title, text, tags of `chunks c` (joined to `docs d`)."""
        if self.format == 2:
            return "c.row, c.chunk_id, c.doc_id, c.title, c.text, c.tags FROM chunks c"
        return (
            "c.row, c.chunk_id, c.doc_id, d.title, c.text, d.tags FROM chunks c"
            " JOIN docs d ON d.id = c.doc_id"
        )

    def chunks_at(self, rows: Sequence[int]) -> list[ChunkRecord]:
        if not rows:
            return []
        marks = ",".join("?" * len(rows))
        found = {
            r[0]: _chunk(r)
            for r in self._query(
                f"SELECT {self._chunk_columns()} WHERE c.row IN ({marks})",
                [int(r) for r in rows],
            )
        }
        return [found[int(r)] for r in rows]

    def iter_chunks(self, page: int = 256) -> Iterator[ChunkRecord]:
        """Every chunk in row order, a page at a time: compaction holds one page, and searches
        of this segment wait for one page's query at most."""
        after = -1
        while True:
            rows = self._query(
                f"SELECT {self._chunk_columns()} WHERE c.row > ? ORDER BY c.row LIMIT ?",
                (after, page),
            )
            for r in rows:
                yield _chunk(r)
            if len(rows) < page:
                return
            after = rows[-1][0]

    def doc(self, doc_id: str) -> DocRecord | None:
        rows = self._query(
            "SELECT id, title, text, metadata, chunk_ids FROM docs WHERE id = ?", (doc_id,)
        )
        return _doc(rows[0]) if rows else None

    def digests(self, doc_ids: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for start in range(0, len(doc_ids), 500):
            part = list(doc_ids[start : start + 500])
            marks = ",".join("?" * len(part))
            out.update(
                (row[0], row[1])
                for row in self._query(f"SELECT id, digest FROM docs WHERE id IN ({marks})", part)
            )
        return out

    def iter_docs(self, page: int = 256) -> Iterator[DocRecord]:
        """Every document in insertion order, a page at a time (as `iter_chunks`)."""
        after = -1
        while True:
            rows = self._query(
                "SELECT rowid, id, title, text, metadata, chunk_ids FROM docs"
                " WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, page),
            )
            for r in rows:
                yield _doc(r[1:])
            if len(rows) < page:
                return
            after = rows[-1][0]

    def close(self) -> None:
        with self._db_lock:
            self._db.close()


def _chunk(row: tuple) -> ChunkRecord:
    return ChunkRecord(row[1], row[2], row[3], row[4], tags=json.loads(row[5]))


def _doc(row: tuple) -> DocRecord:
    return DocRecord(
        id=row[0],
        title=row[1],
        text=row[2],
        metadata=json.loads(row[3]),
        chunk_ids=json.loads(row[4]),
    )


class SegmentWriter:
    """Writes one segment into `folder` (which must not exist): documents, then their chunks,
    then the vectors (given, or filled into `vectors_file()`), then `finish`. Records go to
    SQLite as they come, so what is written need not fit in memory."""

    def __init__(self, folder: Path, dim: int, spec: ANNSpec, embedding_model: str) -> None:
        self.folder, self.dim, self.spec, self.embedding_model = folder, dim, spec, embedding_model
        folder.mkdir(parents=True)
        self._db = sqlite3.connect(folder / "records.sqlite")
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE docs (id TEXT PRIMARY KEY, title TEXT, text TEXT, metadata TEXT,"
            " chunk_ids TEXT, digest TEXT, tags TEXT);"
            "CREATE TABLE chunks (row INTEGER PRIMARY KEY, chunk_id TEXT, doc_id TEXT, text TEXT);"
        )
        # Per row only an 8-byte document hash and a 4-byte collection code are kept.
        self._doc_hashes = array("q")
        self._row_docs = array("q")
        self._collection_codes: dict[str, int] = {}
        self._row_collections = array("i")
        self._vectors: np.memmap | None = None

    def add_docs(self, docs: Iterable[DocRecord]) -> None:
        def rows() -> Iterator[tuple[Any, ...]]:
            for d in docs:
                self._doc_hashes.append(id_hash(d.id))
                yield (
                    d.id,
                    d.title,
                    d.text,
                    json.dumps(d.metadata, ensure_ascii=False),
                    json.dumps(d.chunk_ids),
                    d.digest(),
                    json.dumps(doc_tags(d.metadata), ensure_ascii=False),
                )

        self._db.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?, ?, ?)", rows())

    def add_chunks(self, chunks: Iterable[ChunkRecord]) -> None:
        """After their documents: a chunk takes its title and tags from its document's row, so
        one whose document is not in the segment is refused (it would lose its tags)."""
        known = set(self._doc_hashes)
        codes = self._collection_codes

        def rows() -> Iterator[tuple[Any, ...]]:
            for c in chunks:
                h = id_hash(c.doc_id)
                if h not in known:
                    raise ValueError(f"chunk {c.chunk_id!r}: its document is not in the segment")
                row = len(self._row_docs)
                self._row_docs.append(h)
                collection = split_key(c.doc_id)[0]
                self._row_collections.append(codes.setdefault(collection, len(codes)))
                yield (row, c.chunk_id, c.doc_id, c.text)

        self._db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?)", rows())

    @property
    def rows(self) -> int:
        return len(self._row_docs)

    def vectors_file(self) -> np.memmap:
        """A writable, memory-mapped [rows, dim] array for the chunks added, to fill in place."""
        self._vectors = np.lib.format.open_memmap(
            self.folder / "vectors.npy", mode="w+", dtype=np.float32, shape=(self.rows, self.dim)
        )
        return self._vectors

    def finish(
        self,
        postings: Postings,
        deletes: Iterable[str],
        vectors: np.ndarray | None = None,
    ) -> None:
        """Write what remains and fsync the folder: `vectors` unless `vectors_file` was filled."""
        self._db.commit()
        self._db.close()
        if vectors is not None:
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            np.save(self.folder / "vectors.npy", vectors)
        elif self._vectors is not None:
            self._vectors.flush()
            vectors = self._vectors
        else:
            raise ValueError("no vectors: pass them or fill vectors_file()")
        if vectors.shape != (self.rows, self.dim):
            raise ValueError(f"{vectors.shape} vectors for {self.rows} chunks of {self.dim} dims")
        if postings.matrix.shape[0] != self.rows:
            raise ValueError(f"postings of {postings.matrix.shape[0]} rows for {self.rows} chunks")
        m = postings.matrix.tocsc()
        collections = sorted(self._collection_codes)
        remap = np.zeros(len(collections), dtype=np.int32)
        for name, code in self._collection_codes.items():
            remap[code] = collections.index(name)
        np.savez(
            self.folder / "postings.npz",
            data=m.data.astype(np.float32),
            indices=m.indices,
            indptr=m.indptr,
            shape=np.array(m.shape),
            lengths=postings.lengths.astype(np.float32),
            row_doc=np.frombuffer(self._row_docs, dtype=np.int64),
            doc_hash=np.frombuffer(self._doc_hashes, dtype=np.int64),
            row_collection=remap[np.frombuffer(self._row_collections, dtype=np.int32)],
        )
        (self.folder / "terms.json").write_text(json.dumps(postings.terms, ensure_ascii=False))
        (self.folder / "deletes.json").write_text(json.dumps(sorted(set(deletes))))
        ann_key = None
        if self.spec.kind != "flat" and self.rows >= self.spec.min_rows_for(self.spec.kind):
            import faiss

            index = ann.build(np.asarray(vectors), self.spec)
            faiss.write_index(index, str(self.folder / f"ann-{self.spec.kind}.faiss"))
            ann_key = self.spec.key()
        meta = {
            "format": SEGMENT_FORMAT,
            "documents": len(self._doc_hashes),
            "chunks": self.rows,
            "dim": self.dim,
            "embedding_model": self.embedding_model,
            "ann": ann_key,
            "collections": collections,
        }
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=2))
        fsync_tree(self.folder)


def write_segment(
    folder: Path,
    docs: Sequence[DocRecord],
    chunks: Sequence[ChunkRecord],
    vectors: np.ndarray,
    deletes: Sequence[str],
    spec: ANNSpec,
    embedding_model: str,
    postings: Postings | None = None,
) -> None:
    """Write a complete segment of records held in memory (a write's batch)."""
    if len(vectors) != len(chunks):
        raise ValueError(f"{len(vectors)} vectors for {len(chunks)} chunks")
    dim = int(vectors.shape[1]) if vectors.ndim == 2 else 0
    writer = SegmentWriter(folder, dim, spec, embedding_model)
    writer.add_docs(docs)
    writer.add_chunks(chunks)
    if postings is None:
        postings = Postings.from_texts([f"{c.title}\n{c.text}" for c in chunks])
    writer.finish(postings, deletes, vectors=vectors)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_file(Path(dirpath))
