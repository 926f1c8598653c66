"""The dense search index of a segment: exact (flat), IVF, IVF-PQ or HNSW, on CPU or GPU.

A segment's vectors file stays the record of every vector (it is what a restart, a rebuild or a new
index type start from); an approximate index is built from it for search when configured and the
segment has at least `ann_min_chunks` chunks (smaller ones are searched exactly), and saved beside
it so a restart does not rebuild it. Measured trade-off on MiniLM vectors (`python -m
hybrid_serve.benchmarks.ann_recall`, README): flat is exact and fine to some tens of thousands of
chunks on CPU (13 ms a query at 100k); IVF (nprobe 16) kept recall@10 at 1.00 for 0.15 ms at 100k
and builds in seconds; HNSW is as fast but lost recall on near-duplicate-heavy data (0.86 at 100k,
ef_search 128) and costs memory (M links a vector) and build time. On GPU nodes with
`faiss-gpu-cu12`, flat and IVF move to the GPU (FAISS has no GPU HNSW).

IVF-PQ stores a few dozen bytes a vector instead of 4 x dim (1.5 KB for MiniLM), for millions of
chunks within a replica's memory; its approximate distances pick `refine_factor` x k candidates that
are re-scored exactly from the memory-mapped vectors (`benchmarks.index_scale` measures it)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hybrid_serve.config import IndexKind, RetrieverConfig

log = logging.getLogger(__name__)

# FAISS wants about this many training points per IVF list.
POINTS_PER_LIST = 39


@dataclass(frozen=True)
class ANNSpec:
    kind: IndexKind = "flat"
    ivf_nlist: int | None = None  # None: about 4 x sqrt(n), bounded by the training data
    ivf_nprobe: int = 16
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    pq_m: int | None = None  # None: dim / 8 sub-quantisers (48 bytes a MiniLM vector)
    pq_bits: int = 8
    refine_factor: int = 32
    min_rows: int = 10_000
    gpu: bool = False

    @classmethod
    def from_config(cls, rc: RetrieverConfig) -> ANNSpec:
        return cls(
            kind=rc.index_type,
            ivf_nlist=rc.ivf_nlist,
            ivf_nprobe=rc.ivf_nprobe,
            hnsw_m=rc.hnsw_m,
            hnsw_ef_construction=rc.hnsw_ef_construction,
            hnsw_ef_search=rc.hnsw_ef_search,
            pq_m=rc.pq_m,
            pq_bits=rc.pq_bits,
            refine_factor=rc.refine_factor,
            min_rows=rc.ann_min_chunks,
            gpu=rc.faiss_gpu,
        )

    def key(self) -> dict[str, Any]:
        """What decides the built index (not how it is searched)."""
        d = asdict(self)
        for k in ("ivf_nprobe", "hnsw_ef_search", "refine_factor", "min_rows", "gpu"):
            d.pop(k)
        return d

    def min_rows_for(self, kind: str) -> int:
        """Fewest chunks a segment needs for an index of this kind (product quantisation trains
        2^bits centroids per sub-quantiser; IVF wants points for its lists)."""
        if kind == "flat":
            return 0
        if kind == "ivf_pq":
            return max(self.min_rows, POINTS_PER_LIST * 2**self.pq_bits)
        return self.min_rows


def pq_subquantizers(dim: int, requested: int | None) -> int:
    if requested:
        if dim % requested:
            raise ValueError(f"pq_m {requested} must divide the embedding dimension {dim}")
        return requested
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def ivf_lists(n: int, requested: int | None) -> int:
    if requested:
        return max(1, min(requested, n))
    return max(1, min(int(4 * math.sqrt(max(n, 1))), n // POINTS_PER_LIST or 1))


def build(vectors: np.ndarray, spec: ANNSpec) -> Any:
    """A CPU index over `vectors` (rows in the segment's order) as the spec asks."""
    import faiss

    n, dim = vectors.shape
    index: Any  # FAISS's index classes (SWIG) share no typed base
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.hnsw_ef_construction
    elif spec.kind in ("ivf", "ivf_pq"):
        nlist = ivf_lists(n, spec.ivf_nlist)
        quantizer = faiss.IndexFlatIP(dim)
        if spec.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = pq_subquantizers(dim, spec.pq_m)
            index = faiss.IndexIVFPQ(
                quantizer, dim, nlist, m, spec.pq_bits, faiss.METRIC_INNER_PRODUCT
            )
        if n:
            # k-means on a sample: enough points per list for stable centroids, bounded time.
            index.cp.max_points_per_centroid = 64
            sample = vectors
            if n > 64 * nlist:
                pick = np.random.default_rng(0).choice(n, 64 * nlist, replace=False)
                sample = vectors[np.sort(pick)]
            index.train(np.ascontiguousarray(sample))
    else:
        raise ValueError(f"unknown index type {spec.kind!r}")
    if n:
        index.add(vectors)
    return tune(index, spec)


def tune(index: Any, spec: ANNSpec) -> Any:
    """Search-time parameters, which may differ from the ones an index was saved with."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = spec.hnsw_ef_search
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(spec.ivf_nprobe, index.nlist)
    return index


def search_params(index: Any, spec: ANNSpec, selector: Any) -> Any:
    """Search parameters restricting a search to live rows (tombstones excluded), with the
    index kind's own settings, which a parameters object would otherwise reset."""
    import faiss

    # FAISS's Python layer takes keyword arguments (and keeps the selector alive) that its type
    # stubs do not declare.
    swig: Any = faiss
    if isinstance(index, faiss.IndexIVF):
        return swig.SearchParametersIVF(sel=selector, nprobe=min(spec.ivf_nprobe, index.nlist))
    if isinstance(index, faiss.IndexHNSW):
        return swig.SearchParametersHNSW(sel=selector, efSearch=spec.hnsw_ef_search)
    return swig.SearchParameters(sel=selector)


def gpu_count() -> int:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0  # faiss-cpu
    return int(faiss.get_num_gpus())


_gpu_resources: Any = None


def to_device(index: Any, spec: ANNSpec) -> Any:
    """The index on the GPU when asked for and possible; the CPU index otherwise (logged)."""
    if not spec.gpu:
        return index
    import faiss

    if gpu_count() == 0:
        log.warning("retriever.faiss_gpu is set but FAISS sees no GPU (faiss-gpu not installed?)")
        return index
    if isinstance(index, faiss.IndexHNSW):
        log.warning("FAISS has no GPU HNSW; the HNSW index stays on the CPU")
        return index
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)
