"""Retriever deployment: serves the index snapshot named by CURRENT; any replica may write."""

from __future__ import annotations

import asyncio
import logging
import threading
from importlib import resources
from typing import Any

from ray import serve

from agents.schemas import Passage
from cluster.config import HybridServeConfig
from deployments.placement import placement
from retrieval.embedder import Embedder
from retrieval.store import DocRecord, IndexStore, NewDocument

log = logging.getLogger("ray.serve")


class IndexNotReady(RuntimeError):
    pass


def sample_corpus() -> list[NewDocument]:
    """The project's own documentation, shipped with the package: licence-clean and useful."""
    docs = []
    for entry in sorted(resources.files("cluster").joinpath("sample_corpus").iterdir()):
        if entry.name.endswith(".md"):
            text = entry.read_text(encoding="utf-8")
            title = next(
                (ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")),
                entry.name,
            )
            docs.append(
                NewDocument(
                    id=f"sample:{entry.name}",
                    title=title,
                    text=text,
                    metadata={"source": f"sample_corpus/{entry.name}"},
                )
            )
    return docs


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = HybridServeConfig.from_args(config)
        rc = self.cfg.retriever
        self.embedder = Embedder(rc.embedding_model, batch_size=rc.embed_batch_size)
        self.store = IndexStore(
            self.cfg.index_dir,
            embed=self.embedder.encode,
            dim=self.embedder.dim,
            embedding_model=self.embedder.name,
            chunk_words=rc.chunk_words,
            chunk_overlap_words=rc.chunk_overlap_words,
            keep_snapshots=rc.keep_snapshots,
            ann_spec=rc.ann_spec(),
        )
        self.state = "loading"
        self.progress: dict[str, int] = {}
        self.error: str | None = None
        self.store.refresh()
        if self.store.exists() or not rc.index_sample_corpus:
            self.state = "ready"
        else:
            # Index the sample corpus off the constructor so the replica answers /readyz with
            # progress meanwhile; searches wait for it.
            self.state = "indexing sample corpus"
            threading.Thread(target=self._index_sample, daemon=True).start()

    def _index_sample(self) -> None:
        try:
            docs = sample_corpus()

            def progress(done: int, total: int) -> None:
                self.progress = {"done": done, "total": total}

            self.store.upsert(docs, progress=progress)
            self.state = "ready"
        except Exception as exc:  # reported by status(); the replica stays up to say so
            log.exception("indexing the sample corpus failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"

    def _require_ready(self) -> None:
        if self.state != "ready":
            raise IndexNotReady(f"index is {self.state}")

    async def search(self, query: str, top_k: int = 5) -> list[Passage]:
        return (await self.search_versioned(query, top_k))[0]

    async def search_versioned(self, query: str, top_k: int = 5) -> tuple[list[Passage], int]:
        """The hits and the index version served (one call instead of search + status)."""
        self._require_ready()
        rc = self.cfg.retriever
        self.store.refresh()
        snapshot = self.store.snapshot
        hits = await asyncio.to_thread(
            self.store.search,
            query,
            top_k,
            rc.candidates,
            rc.rrf_k,
            rc.dense_weight,
            rc.bm25_weight,
        )
        return hits, snapshot.version if snapshot else 0

    async def upsert(self, documents: list[NewDocument]) -> dict[str, Any]:
        self._require_ready()
        version, ids = await asyncio.to_thread(self.store.upsert, documents)
        return {"index_version": version, "ids": ids}

    async def delete(self, doc_ids: list[str]) -> dict[str, Any]:
        self._require_ready()
        version, deleted = await asyncio.to_thread(self.store.delete, doc_ids)
        return {"index_version": version, "deleted": deleted}

    async def get(self, doc_id: str) -> DocRecord | None:
        self._require_ready()
        self.store.refresh()
        return self.store.get(doc_id)

    async def status(self) -> dict[str, Any]:
        if self.state == "ready":
            self.store.refresh()
        return {
            "ready": self.state == "ready",
            "state": self.state,
            "progress": self.progress,
            "error": self.error,
            **self.store.stats(),
            "placement": placement(),
        }
