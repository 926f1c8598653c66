"""The Ray Data ingestion pipeline on the shared cluster: bad records skipped by line, the last
copy of an id wins, several segments published, and a run that dies half-way resumes: the
second run skips what the first published and adds the rest."""

import json

import pytest

from hybrid_serve.cluster import ingest
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.retrieval.embedder import Embedder
from hybrid_serve.retrieval.store import IndexStore

pytestmark = pytest.mark.integration


def test_pipeline_publishes_segments_and_resumes_after_a_crash(app, tmp_path, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"id": f"n{i}", "title": f"Note {i}", "text": f"Note {i} mentions zq{i}x."})
        for i in range(30)
    ]
    lines[5] = '{"id": "n5", "title": broken'
    lines.append(json.dumps({"id": "n7", "title": "Note 7", "text": "Rewritten: zq7x again."}))
    path.write_text("\n".join(lines) + "\n")
    cfg = HybridServeConfig(data_dir=str(tmp_path / "data"))
    embedder = Embedder()

    def store():
        return IndexStore.from_config(cfg.index_dir, cfg.retriever, embedder)

    calls = {"n": 0}
    publish = IndexStore.add_embedded

    def dies_on_the_third_segment(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return publish(self, *args)

    monkeypatch.setattr(IndexStore, "add_embedded", dies_on_the_third_segment)
    with pytest.raises(RuntimeError, match="killed"):
        ingest.run(cfg, [path], segment_chunks=8, store=store())
    monkeypatch.setattr(IndexStore, "add_embedded", publish)
    first = store()
    first.refresh()
    kept = first.stats()["documents"]
    assert 8 <= kept < 29  # two segments of at least 8 chunks were published before the crash

    result = ingest.run(cfg, [path], segment_chunks=8, store=store())
    assert [str(b) for b in result.bad] == [f"{path}:6: invalid JSON: Expecting value (column 23)"]
    assert result.duplicates == 1 and result.unchanged == kept
    assert result.documents == 29 - kept and result.workers >= 1
    final = store()
    final.refresh()
    assert final.stats()["documents"] == 29
    assert final.get("n7").text == "Rewritten: zq7x again."  # the later copy
    assert final.search("zq23x", top_k=1)[0].doc_id == "n23"
    assert not list((tmp_path / "data" / "ingest").glob("job-*"))  # staging removed
