"""The persistent index with the real embedder and real FAISS/BM25 (no Ray)."""

import json

import pytest

from hybrid_serve.retrieval.store import IndexStore, NewDocument

DOCS = [
    NewDocument(id="paris", title="Paris", text="Paris is the capital and largest city of France."),
    NewDocument(id="nile", title="Nile", text="The Nile is a major north-flowing river in Africa."),
    NewDocument(id="python", title="Python", text="Python is a programming language by Guido."),
]


def test_search_finds_the_right_document(tmp_path, make):
    store = make(tmp_path)
    version, ids = store.upsert(DOCS)
    assert version == 1 and ids == ["paris", "nile", "python"]
    hits = store.search("Which river flows north through Africa?", top_k=2)
    assert hits[0].doc_id == "nile"
    assert hits[0].dense_score > 0.3 and hits[0].bm25_score > 0
    # BM25 alone finds an exact rare token
    assert store.search("Guido", top_k=1)[0].doc_id == "python"


def test_restart_loads_without_reembedding(tmp_path, make, embedder):
    make(tmp_path).upsert(DOCS)
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return embedder.encode(texts)

    again = IndexStore(tmp_path, counting, embedder.dim)
    assert again.refresh() and again.version == 1
    assert again.stats()["documents"] == 3
    calls.clear()
    again.search("capital of France", 1)
    assert calls == [1]  # only the query was embedded: the index came from disk


def test_upsert_replaces_and_unchanged_is_a_noop(tmp_path, make):
    store = make(tmp_path)
    store.upsert(DOCS)
    v_same, _ = store.upsert([DOCS[0]])
    assert v_same == 1  # identical content: no new version
    v2, _ = store.upsert([NewDocument(id="paris", title="Paris", text="Paris hosts the Louvre.")])
    assert v2 == 2 and store.stats()["documents"] == 3
    assert store.get("paris").text == "Paris hosts the Louvre."
    hits = store.search("capital and largest city of France", top_k=3)
    assert all("capital" not in h.text for h in hits if h.doc_id == "paris")


def test_delete_removes_from_dense_and_bm25(tmp_path, make):
    store = make(tmp_path)
    store.upsert(DOCS)
    version, deleted = store.delete(["python", "missing"])
    assert deleted == ["python"] and version == 2
    assert all(h.doc_id != "python" for h in store.search("Guido programming language", 3))
    assert store.search("Guido", top_k=3) == [] or all(
        h.bm25_score is None for h in store.search("Guido", top_k=3)
    )
    assert store.stats()["documents"] == 2 and store.get("python") is None


def test_content_ids_make_retries_idempotent(tmp_path, make):
    store = make(tmp_path)
    doc = NewDocument(title="T", text="Some text about owls.")
    _, first = store.upsert([doc])
    version, second = store.upsert([doc])
    assert first == second and version == 1


def test_other_replica_sees_new_version(tmp_path, make):
    a, b = make(tmp_path), make(tmp_path)
    a.upsert(DOCS[:1])
    b.refresh()
    b.upsert(DOCS[1:])  # b writes on top of a's version, not over it
    a.refresh()
    assert a.version == b.version == 2 and a.stats()["documents"] == 3


def test_crash_leftovers_are_ignored(tmp_path, make):
    store = make(tmp_path, keep_snapshots=1)
    store.upsert(DOCS[:1])
    # a writer died half-way: a temporary segment, an orphan segment and a manifest never made
    # CURRENT
    (tmp_path / "segments" / ".tmp-dead").mkdir()
    (tmp_path / "segments" / "seg-orphan").mkdir()
    (tmp_path / "manifests" / "m00000009.json").write_text('{"segments": ["seg-orphan"]}')
    again = make(tmp_path, keep_snapshots=1)
    again.refresh()
    assert again.version == 1
    again.upsert(DOCS[1:2])
    manifests = sorted(p.name for p in (tmp_path / "manifests").iterdir())
    assert manifests == ["m00000001.json", "m00000002.json"]
    segments = sorted(p.name for p in (tmp_path / "segments").iterdir())
    manifest = json.loads((tmp_path / "manifests" / "m00000002.json").read_text())
    assert segments == sorted(manifest["segments"]) and len(segments) == 2
    assert manifest["documents"] == 2


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_is_saved_and_reloaded_not_rebuilt(tmp_path, make, kind, caplog):
    from hybrid_serve.retrieval.ann import ANNSpec

    spec = ANNSpec(kind=kind, ivf_nlist=2, ivf_nprobe=2, min_rows=0)
    store = make(tmp_path, ann_spec=spec)
    store.upsert(DOCS)
    assert store.stats()["index_type"] == kind
    assert store.view.segments[0].index_kind == kind
    assert store.search("Which river flows north through Africa?", top_k=1)[0].doc_id == "nile"
    folder = store.view.segments[0].folder
    assert (folder / f"ann-{kind}.faiss").is_file()
    caplog.set_level("INFO", logger="hybrid_serve.retrieval")
    again = make(tmp_path, ann_spec=spec)
    again.refresh()
    assert not any("building" in r.message for r in caplog.records)
    assert again.search("capital of France", top_k=1)[0].doc_id == "paris"
    # Other build parameters: rebuilt in memory from the flat record, same answers.
    other = make(tmp_path, ann_spec=ANNSpec(kind=kind, ivf_nlist=1, hnsw_m=8, min_rows=0))
    other.refresh()
    assert any("building" in r.message for r in caplog.records)
    assert other.search("Guido programming", top_k=1)[0].doc_id == "python"


def test_approximate_indexes_agree_with_exact_search_on_random_vectors():
    import numpy as np

    from hybrid_serve.retrieval import ann
    from hybrid_serve.retrieval.ann import ANNSpec

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 32)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:200] + 0.05 * rng.standard_normal((200, 32)).astype("float32")
    _, exact = ann.build(x, ANNSpec()).search(q, 10)
    specs = (ANNSpec(kind="hnsw"), ANNSpec(kind="ivf", ivf_nprobe=32))
    specs += (ANNSpec(kind="ivf_pq", ivf_nprobe=32, pq_m=16),)
    for spec in specs:
        _, approx = ann.build(x, spec).search(q, 10 * spec.refine_factor)
        if spec.kind == "ivf_pq":  # codes pick candidates, exact vectors rank them
            exact_scores = np.einsum("qkd,qd->qk", x[approx], q)
            approx = np.take_along_axis(approx, np.argsort(-exact_scores, axis=1), axis=1)
        approx = approx[:, :10]
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
        assert recall > 0.8, (spec.kind, recall)
    assert ann.ivf_lists(4000, None) == 102 and ann.ivf_lists(10, None) == 1
    assert ann.to_device("index", ANNSpec(gpu=True)) == "index" or ann.gpu_count() > 0


def test_a_slow_embedding_holds_up_no_other_writer(tmp_path, embedder):
    """Embedding runs before the writer lock: a large document being embedded does not keep a
    small one (or a delete) from being acknowledged; both end up in the index."""
    import threading

    release, embedding = threading.Event(), threading.Event()

    def embed(texts):
        if any("slow" in t for t in texts):
            embedding.set()
            assert release.wait(30)
        return embedder.encode(texts)

    store = IndexStore(tmp_path, embed, embedder.dim)
    slow = threading.Thread(
        target=store.upsert, args=([NewDocument(id="big", title="B", text="A slow one.")],)
    )
    slow.start()
    assert embedding.wait(30)
    version, ids = store.upsert([DOCS[1]])  # returns while the other is still embedding
    assert ids == ["nile"] and slow.is_alive()
    release.set()
    slow.join(30)
    assert store.get("nile") is not None and store.get("big") is not None
    assert store.version == version + 1
