"""The segmented index: a write costs its batch, tombstones hide old copies everywhere, fan-out
search ranks as one index would, compaction keeps every answer and yields to concurrent writes,
and the snapshot format of earlier releases is converted without re-embedding (no Ray)."""

import json

import numpy as np
import pytest

from hybrid_serve.retrieval.segment import Postings, bm25_tokenize
from hybrid_serve.retrieval.store import IndexStore, NewDocument

TOPICS = [
    ("Paris", "Paris is the capital and largest city of France, on the Seine."),
    ("Nile", "The Nile is a major north-flowing river in northeastern Africa."),
    ("Python", "Python is a programming language created by Guido van Rossum."),
    ("Everest", "Mount Everest is the highest mountain above sea level, in the Himalayas."),
    ("Jupiter", "Jupiter is the largest planet in the Solar System, a gas giant."),
    ("Mozart", "Wolfgang Amadeus Mozart was a prolific composer of the Classical period."),
    ("Amazon", "The Amazon rainforest covers much of the Amazon basin of South America."),
    ("Tokyo", "Tokyo is the capital of Japan and its most populous city."),
]
QUERIES = [
    "Which river flows north through Africa?",
    "capital city of France",
    "Who created the Python language?",
    "largest planet gas giant",
    "classical composer",
    "capital of Japan",
]


def docs(prefix=""):
    return [NewDocument(id=f"{prefix}{t}", title=t, text=x) for t, x in TOPICS]


def ranking(store, query):
    return [
        (h.chunk_id, round(h.score, 6), round(h.dense_score, 5)) for h in store.search(query, 5)
    ]


def test_a_write_is_one_segment_of_its_batch(tmp_path, make, embedder):
    store = make(tmp_path, merge_factor=100)
    store.upsert(docs())
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return embedder.encode(texts)

    store.embed = counting
    version, _ = store.upsert([NewDocument(id="extra", title="Owls", text="Owls hunt at night.")])
    assert version == 2 and calls == [1]  # only the new chunk was embedded
    view = store.view
    assert len(view.segments) == 2 and view.segments[1].rows == 1
    assert view.segments[0].name in (tmp_path / "manifests" / "m00000002.json").read_text()


def test_fan_out_ranks_as_one_index_would(tmp_path, make):
    one = make(tmp_path / "one")
    one.upsert(docs())
    many = make(tmp_path / "many", merge_factor=100)
    for d in docs():
        many.upsert([d])
    assert len(many.view.segments) == len(TOPICS) and len(one.view.segments) == 1
    for q in QUERIES:
        assert ranking(many, q) == ranking(one, q), q


def test_bm25_scores_equal_bm25s_on_one_segment():
    import bm25s

    texts = [f"{t}\n{x}" for t, x in TOPICS]
    lib = bm25s.BM25()
    lib.index(bm25_tokenize(texts), show_progress=False)
    ours = Postings.from_texts(texts)
    avgdl = float(ours.lengths.mean())
    for q in QUERIES:
        tokens = [t for t in bm25_tokenize([q])[0] if t in lib.vocab_dict]
        from hybrid_serve.retrieval.segment import bm25_idf

        terms = {t: bm25_idf(ours.df(t), len(texts)) for t in tokens}
        expected = lib.get_scores(tokens) if tokens else np.zeros(len(texts))
        assert np.allclose(ours.score(terms, avgdl), expected, atol=1e-5), q


def test_tombstones_hide_replaced_and_deleted_copies(tmp_path, make):
    store = make(tmp_path, merge_factor=100)
    store.upsert(docs())
    store.upsert([NewDocument(id="Paris", title="Paris", text="Paris hosts the Louvre museum.")])
    store.delete(["Python"])
    assert store.stats()["documents"] == len(TOPICS) - 1
    assert store.stats()["chunks"] == len(TOPICS) - 1
    hits = store.search("capital and largest city of France", 8)
    assert [h.text for h in hits if h.doc_id == "Paris"] == ["Paris hosts the Louvre museum."]
    assert all(h.doc_id != "Python" for h in store.search("Guido van Rossum programming", 8))
    assert store.get("Python") is None and store.get("Paris").text.startswith("Paris hosts")
    # a deleted id comes back when sent again
    store.upsert([NewDocument(id="Python", title="Python", text="Python is a snake.")])
    assert store.get("Python").text == "Python is a snake."


def test_compaction_merges_and_keeps_every_answer(tmp_path, make, embedder):
    store = make(tmp_path, merge_factor=4)
    for d in docs():
        store.upsert([d])
    store.delete(["Tokyo"])
    before = {q: ranking(store, q) for q in QUERIES}
    assert store.compaction_plan() is not None
    while store.compact():
        pass
    assert len(store.view.segments) < len(TOPICS)
    assert store.compact(force=True) and len(store.view.segments) == 1
    assert store.view.segments[0].rows == len(TOPICS) - 1  # the tombstoned chunk is gone
    assert store.view.segments[0].deletes == []  # nothing older to delete from
    for q in QUERIES:
        assert [r[0] for r in ranking(store, q)] == [r[0] for r in before[q]], q
    assert store.get("Tokyo") is None and store.stats()["documents"] == len(TOPICS) - 1
    # restart: loads the merged segment, no re-embedding
    again = IndexStore(tmp_path, lambda t: embedder.encode(t), embedder.dim)
    again.refresh()
    assert again.stats()["documents"] == len(TOPICS) - 1
    segments = sorted(p.name for p in (tmp_path / "segments").iterdir())
    kept = set()
    for m in (tmp_path / "manifests").iterdir():
        kept.update(json.loads(m.read_text())["segments"])
    assert set(segments) == kept  # merged-away segments are collected past keep_snapshots


def test_a_write_during_compaction_keeps_its_precedence(tmp_path, make):
    store = make(tmp_path, merge_factor=100)
    for d in docs():
        store.upsert([d])
    other = make(tmp_path)  # another replica, writing while the merge is built
    original = IndexStore._write_merged

    def write_then_race(self, *args):
        original(self, *args)
        other.upsert([NewDocument(id="Paris", title="Paris", text="Paris hosts the Louvre.")])
        other.delete(["Nile"])

    store._write_merged = write_then_race.__get__(store)
    assert store.compact(force=True)
    store._write_merged = original.__get__(store)
    assert store.get("Paris").text == "Paris hosts the Louvre."
    assert store.get("Nile") is None
    assert all(h.doc_id != "Nile" for h in store.search("river in Africa", 8))
    assert store.stats()["documents"] == len(TOPICS) - 1
    assert len(store.view.segments) == 3  # merged, the replacement, the delete


def test_snapshot_format_1_is_converted_without_reembedding(tmp_path, embedder):
    import faiss

    folder = tmp_path / "snapshots" / "v00000004"
    folder.mkdir(parents=True)
    texts = [x for _, x in TOPICS]
    vectors = embedder.encode(texts)
    with open(folder / "docs.jsonl", "w") as f:
        for t, x in TOPICS:
            f.write(
                json.dumps(
                    {
                        "id": t,
                        "title": t,
                        "text": x,
                        "metadata": {"tags": ["kb"]},
                        "chunk_ids": [f"{t}#0"],
                    }
                )
                + "\n"
            )
    with open(folder / "chunks.jsonl", "w") as f:
        for t, x in TOPICS:
            f.write(json.dumps({"chunk_id": f"{t}#0", "doc_id": t, "title": t, "text": x}) + "\n")
    dense = faiss.IndexFlatIP(embedder.dim)
    dense.add(vectors)
    faiss.write_index(dense, str(folder / "dense.faiss"))
    (folder / "manifest.json").write_text(
        json.dumps({"format": 1, "version": 4, "documents": 8, "chunks": 8})
    )
    (tmp_path / "CURRENT").write_text("v00000004\n")
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return embedder.encode(batch)

    store = IndexStore(tmp_path, counting, embedder.dim)
    assert store.refresh()
    assert store.version == 4 and store.stats()["documents"] == len(TOPICS)
    assert calls == []  # vectors came from the old FAISS file
    hit = store.search("Which river flows north through Africa?", 1)[0]
    assert hit.doc_id == "Nile" and hit.tags == ["kb"]
    assert not (tmp_path / "snapshots").exists()
    assert (tmp_path / "CURRENT").read_text().strip() == "m00000004"


def test_embedding_device_auto_cpu_and_cuda_without_a_gpu():
    import torch

    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.retrieval.embedder import resolve_device

    assert HybridServeConfig().retriever.device == "auto"
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto") == resolve_device("cuda") == "cuda"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError):
        HybridServeConfig.model_validate({"retriever": {"device": "tpu"}})


def hashed_vectors(texts, dim=8):
    """Vectors that depend only on the text: embedding costs nothing in tests of storage."""
    out = np.stack(
        [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(dim) for t in texts]
    ).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_titles_and_tags_are_stored_once_per_document(tmp_path, make):
    import sqlite3

    store = make(tmp_path)  # 40-word chunks
    tags = [f"tag-{i}" for i in range(32)]
    text = " ".join(f"word{i}" for i in range(400))
    store.upsert([NewDocument(id="long", title="T" * 200, text=text, metadata={"tags": tags})])
    seg = store.view.segments[0]
    assert seg.rows > 10
    db = sqlite3.connect(seg.folder / "records.sqlite")
    columns = [r[1] for r in db.execute("PRAGMA table_info(chunks)")]
    assert columns == ["row", "chunk_id", "doc_id", "text"]
    assert db.execute("SELECT tags FROM docs").fetchall() == [(json.dumps(tags),)]
    db.close()
    hit = store.search("word7 word8", 1)[0]
    assert hit.tags == tags and hit.title == "T" * 200  # joined back onto every hit


def test_segments_of_format_2_are_still_read(tmp_path, make):
    """Segments written before titles and tags moved to the document (a copy on each chunk)."""
    import sqlite3

    store = make(tmp_path)
    store.upsert(
        [NewDocument(id="Nile", title="Nile", text=TOPICS[1][1], metadata={"tags": ["kb"]})]
    )
    folder = store.view.segments[0].folder
    db = sqlite3.connect(folder / "records.sqlite")
    db.executescript(
        "ALTER TABLE chunks ADD COLUMN title TEXT; ALTER TABLE chunks ADD COLUMN tags TEXT;"
        "UPDATE chunks SET title = 'Nile', tags = '[\"kb\"]'; ALTER TABLE docs DROP COLUMN tags;"
    )
    db.commit()
    db.close()
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 2}))
    again = make(tmp_path)
    assert again.refresh()
    hit = again.search("river in Africa", 1)[0]
    assert hit.doc_id == "Nile" and hit.title == "Nile" and hit.tags == ["kb"]
    again.upsert(docs("new-"))
    assert again.compact(force=True)  # format 2 merged into format 3
    assert json.loads((again.view.segments[0].folder / "meta.json").read_text())["format"] == 3
    assert again.search("river in Africa", 1)[0].tags in (["kb"], [])
    nile = [h for h in again.search("Nile river Africa", 9) if h.doc_id == "Nile"]
    assert nile and nile[0].tags == ["kb"]


def test_compaction_streams_what_it_merges(tmp_path):
    """Merging holds a page of records, not the segments: peak Python memory stays a small
    fraction of the text merged (vectors go straight to the new segment's mapped file)."""
    import tracemalloc

    store = IndexStore(
        tmp_path, hashed_vectors, 8, "hashed", chunk_words=2000, chunk_chars=4000,
        merge_factor=100,
    )  # fmt: skip
    per_doc = 3900
    for part in range(4):
        store.upsert(
            [
                NewDocument(id=f"d{part}-{i}", title="t", text=f"doc{part}x{i} " + "z" * per_doc)
                for i in range(1500)
            ]
        )
    merged_text = 4 * 1500 * per_doc
    tracemalloc.start()
    try:
        assert store.compact(force=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.view.segments[0].rows == 6000
    assert peak < merged_text / 3, f"peak {peak / 1e6:.1f} MB for {merged_text / 1e6:.1f} MB"
    assert store.get("d3-1499").text.endswith("z" * 10)
