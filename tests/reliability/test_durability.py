"""SIGKILL to every process of a cluster in the middle of a document ingestion batch: after a
restart every acknowledged document is there and retrievable, no document is half-indexed (a
batch is all or nothing), and the index loads from disk without being rebuilt.

Starts its own cluster (`hybrid-serve up`), so it runs before the shared one."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from hybrid_serve.config import HybridServeConfig
from hybrid_serve.retrieval.chunking import chunk_text
from tests.conftest import free_port, wait_ready
from tests.support.cli import STARTED, Up

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster, pytest.mark.reliability]

WORDS = "river mountain lantern harbor copper meadow signal orchard velvet granite".split()


def document(batch: int, i: int) -> dict:
    """A document long enough for several chunks, with a term no other document has."""
    tag = f"zq{batch:03d}x{i:02d}"
    body = " ".join(WORDS[(batch + i + k) % len(WORDS)] for k in range(420))
    return {
        "id": f"dur-{batch}-{i}",
        "title": f"Batch {batch} document {i}",
        "text": f"The marker {tag} names this document. {body} End of {tag}.",
    }


def test_sigkill_mid_ingestion_loses_no_acknowledged_document(tmp_path, request):
    long = request.config.getoption("--reliability-long")
    data = tmp_path / "data"
    port = free_port()
    up = Up(data, port)
    sent: dict[int, list[dict]] = {}
    acked: dict[int, int] = {}  # batch -> index version acknowledged
    in_flight: list[int] = []
    stop = threading.Event()

    def ingest() -> None:
        with httpx.Client(base_url=up.url, timeout=120) as client:
            batch = 0
            while not stop.is_set():
                docs = [document(batch, i) for i in range(6)]
                sent[batch] = docs
                in_flight.append(batch)
                try:
                    r = client.post("/v1/documents", json={"documents": docs})
                except httpx.HTTPError:
                    return  # the cluster died under this batch
                if r.status_code == 201:
                    acked[batch] = r.json()["index_version"]
                batch += 1

    try:
        up.wait_for(STARTED)
        wait_ready(up.url)
        worker = threading.Thread(target=ingest, daemon=True)
        worker.start()
        target = 12 if long else 3
        deadline = time.monotonic() + 300
        while len(acked) < target and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(acked) >= target, "ingestion did not progress"
        time.sleep(0.4)  # well inside the next batch (about a second each on two cores)
        killed = up.kill_all()
        stop.set()
        worker.join(timeout=60)
    finally:
        if up.proc.poll() is None:
            up.kill_all()
    assert len(killed) > 5  # up, GCS, raylet, workers, replicas
    unacked = [b for b in sent if b not in acked]
    assert unacked, "the kill landed between batches; nothing was in flight"

    restart = Up(data, port)
    try:
        restart.wait_for(STARTED)
        status = wait_ready(restart.url)["components"]["retriever"]
        # Loaded from disk: the snapshot of the last acknowledged batch (or the in-flight one, if
        # it committed before the kill), no re-indexing of anything.
        assert status["version"] >= max(acked.values())
        assert status["progress"] == {}
        cfg = HybridServeConfig().retriever
        with httpx.Client(base_url=restart.url, timeout=120) as client:
            for batch, docs in sent.items():
                present = []
                for doc in docs:
                    r = client.get(f"/v1/documents/{doc['id']}")
                    assert r.status_code in (200, 404), r.text
                    if r.status_code == 200:
                        info = r.json()
                        assert info["text"] == doc["text"]
                        expected = chunk_text(doc["text"], cfg.chunk_words, cfg.chunk_overlap_words)
                        assert info["chunks"] == len(expected), "half-indexed document"
                    present.append(r.status_code == 200)
                if batch in acked:
                    assert all(present), f"acknowledged batch {batch} lost documents"
                else:
                    assert all(present) or not any(present), f"batch {batch} half-applied"
            # Acknowledged documents are retrievable, by their own term.
            for batch in list(acked)[:: max(1, len(acked) // 3)]:
                doc = sent[batch][0]
                tag = doc["text"].split()[2]
                r = client.post("/v1/search", json={"query": tag, "top_k": 3})
                assert r.status_code == 200
                assert doc["id"] in {p["doc_id"] for p in r.json()["passages"]}
    finally:
        restart.stop()
