"""Retriever deployment: serves the index version CURRENT names; any replica may write, and
compacts segments in a background thread after its writes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from importlib import resources
from typing import Any

from opentelemetry.trace import SpanKind
from ray import serve
from ray.serve import Application

from hybrid_serve.agents import tracing
from hybrid_serve.agents.tracing import TraceContext
from hybrid_serve.config import HybridServeConfig, RetrieverConfig, TracingConfig
from hybrid_serve.deployments import tunables
from hybrid_serve.deployments.handles import IndexNotReady
from hybrid_serve.deployments.metrics import keep_gauges_fresh, metrics
from hybrid_serve.deployments.placement import cpu_actor_options, deployment, placement
from hybrid_serve.deployments.versions import versioned
from hybrid_serve.retrieval.embedder import Embedder
from hybrid_serve.retrieval.segment import doc_key
from hybrid_serve.retrieval.store import DocRecord, IndexStore, NewDocument
from hybrid_serve.schemas import DEFAULT_COLLECTION, Collections, Passage

log = logging.getLogger("ray.serve")


def sample_corpus() -> list[NewDocument]:
    """The project's own documentation, shipped with the package: licence-clean and useful."""
    docs = []
    folder = resources.files("hybrid_serve.cluster").joinpath("sample_corpus")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
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
    """Binds its own section: the index's and the embedder's settings (new replicas when they
    change); the fusion weights are tunables, taken in place (`reconfigure`)."""

    def __init__(self, retriever: dict[str, Any], index_dir: str, trace: dict[str, Any]) -> None:
        tracing.setup("Retriever", TracingConfig.model_validate(trace))
        rc = self.rc = RetrieverConfig.model_validate(retriever)
        self.embedder = Embedder(rc.embedding_model, rc.embed_batch_size, rc.device)
        self.store = IndexStore.from_config(index_dir, rc, self.embedder)
        self.state = "loading"
        self.progress: dict[str, int] = {}
        self.error: str | None = None
        self.store.refresh()
        keep_gauges_fresh(self._index_gauges)
        self._compaction_wanted = threading.Event()
        threading.Thread(target=self._compact_in_background, daemon=True).start()
        if self.store.exists() or not rc.index_sample_corpus:
            self.state = "ready"
        else:
            # Index the sample corpus off the constructor so the replica answers /readyz with
            # progress meanwhile; searches wait for it.
            self.state = "indexing sample corpus"
            threading.Thread(target=self._index_sample, daemon=True).start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after the constructor and whenever the tunables change."""
        self.rc = RetrieverConfig.model_validate({**self.rc.model_dump(), **user_config})

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

    def _compact_in_background(self) -> None:
        """Merges segments after writes, off the request path; writes go on meanwhile."""
        while True:
            self._compaction_wanted.wait()
            self._compaction_wanted.clear()
            try:
                while self.store.compact():
                    self._index_gauges()
            except Exception:  # the index is unchanged: a failed merge publishes nothing
                log.exception("index compaction failed")

    def _require_ready(self) -> None:
        if self.state != "ready":
            raise IndexNotReady(f"index is {self.state}")

    def _index_gauges(self) -> dict[str, Any]:
        """Sets the index gauges from the version served (no I/O: safe from the gauge thread)."""
        stats = self.store.stats()
        metrics.set("hybrid_serve_index_documents", stats["documents"])
        metrics.set("hybrid_serve_index_chunks", stats["chunks"])
        metrics.set("hybrid_serve_index_version", stats["version"])
        metrics.set("hybrid_serve_index_segments", stats["segments"])
        return stats

    async def search(
        self,
        query: str,
        top_k: int = 5,
        collections: Collections = None,
        trace_context: TraceContext = None,
    ) -> list[Passage]:
        return (await self.search_versioned(query, top_k, collections, trace_context))[0]

    async def search_versioned(
        self,
        query: str,
        top_k: int = 5,
        collections: Collections = None,
        trace_context: TraceContext = None,
    ) -> tuple[list[Passage], int]:
        """The hits within `collections` (None: all) and the index version served (one call
        instead of search + status)."""
        attributes = {"hybrid.retrieval.top_k": top_k}
        with tracing.span("Retriever.search", trace_context, SpanKind.SERVER, attributes):
            self._require_ready()
            rc = self.rc
            self.store.refresh()
            view = self.store.view
            start = time.perf_counter()
            hits = await asyncio.to_thread(
                self.store.search,
                query,
                top_k,
                rc.candidates,
                rc.rrf_k,
                rc.dense_weight,
                rc.bm25_weight,
                collections,
            )
            latency_ms = (time.perf_counter() - start) * 1000
            metrics.observe("hybrid_serve_retrieval_latency_ms", latency_ms)
            version = view.version if view else 0
            tracing.annotate(
                {
                    "hybrid.retrieval.hits": len(hits),
                    "hybrid.index.version": version,
                    "hybrid.retrieval.index_type": rc.index_type,
                }
            )
            return hits, version

    async def embed_versioned(
        self, text: str, trace_context: TraceContext = None
    ) -> tuple[list[float], int]:
        """The text's embedding and the index version served: what the answer cache keys on."""
        with tracing.span("Retriever.embed", trace_context, SpanKind.SERVER):
            self._require_ready()
            self.store.refresh()
            view = self.store.view
            vector = await asyncio.to_thread(self.embedder.encode, [text])
            return vector[0].tolist(), view.version if view else 0

    async def upsert(
        self, documents: list[NewDocument], trace_context: TraceContext = None
    ) -> dict[str, Any]:
        attributes = {"hybrid.documents": len(documents)}
        with tracing.span("Retriever.upsert", trace_context, SpanKind.SERVER, attributes):
            self._require_ready()
            version, ids = await asyncio.to_thread(self.store.upsert, documents)
            tracing.annotate({"hybrid.index.version": version})
            self._index_gauges()
            self._compaction_wanted.set()
            return {"index_version": version, "ids": ids}

    async def delete(
        self,
        doc_ids: list[str],
        collection: str = DEFAULT_COLLECTION,
        trace_context: TraceContext = None,
    ) -> dict[str, Any]:
        """Removes the documents of `collection` with these ids; `deleted` lists the ids that
        existed there."""
        attributes = {"hybrid.documents": len(doc_ids)}
        with tracing.span("Retriever.delete", trace_context, SpanKind.SERVER, attributes):
            self._require_ready()
            keys = {doc_key(collection, d): d for d in doc_ids}
            version, deleted = await asyncio.to_thread(self.store.delete, list(keys))
            self._index_gauges()
            self._compaction_wanted.set()
            return {"index_version": version, "deleted": [keys[k] for k in deleted]}

    async def get(
        self,
        doc_id: str,
        collections: Collections = None,
        trace_context: TraceContext = None,
    ) -> DocRecord | None:
        """The document with this id in the first of `collections` (in the caller's order;
        None: the default collection first, then the others by name) that holds one."""
        with tracing.span("Retriever.get", trace_context, SpanKind.SERVER):
            self._require_ready()
            self.store.refresh()
            view = self.store.view
            names = (
                sorted(collections)
                if collections is not None
                else (view.collections() if view else [])
            )
            names.sort(key=lambda n: n != DEFAULT_COLLECTION)
            for name in names:
                record = self.store.get(doc_key(name, doc_id))
                if record is not None:
                    return record
            return None

    async def status(self, trace_context: TraceContext = None) -> dict[str, Any]:
        if self.state == "ready":
            self.store.refresh()
            stats = self._index_gauges()
        else:
            stats = self.store.stats()
        return {
            "ready": self.state == "ready",
            "state": self.state,
            "progress": self.progress,
            "error": self.error,
            **stats,
            "placement": placement(),
        }


def get_deployment_options(cfg: HybridServeConfig) -> dict[str, Any]:
    rc = cfg.retriever
    return {
        "num_replicas": rc.replicas,
        "max_ongoing_requests": rc.max_ongoing_requests,
        "ray_actor_options": (
            {"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus}
            if rc.num_gpus  # FAISS on a GPU node
            else cpu_actor_options(cfg, rc.num_cpus)
        ),
        "user_config": tunables.retriever(cfg),
    }


def bind_args(cfg: HybridServeConfig) -> tuple[Any, ...]:
    return cfg.retriever.fixed(), str(cfg.index_dir), cfg.tracing.model_dump(mode="json")


def build_retriever(cfg: HybridServeConfig) -> Application:
    return versioned(deployment(RetrieverDeployment), get_deployment_options(cfg), *bind_args(cfg))
