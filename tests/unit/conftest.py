"""Fixtures of the index unit tests (real embedder, real FAISS, no Ray)."""

import pytest

from hybrid_serve.retrieval.embedder import Embedder
from hybrid_serve.retrieval.store import IndexStore


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def make(embedder):
    """A store on `root` with small chunks, so short test documents are one chunk each."""

    def build(root, **kw) -> IndexStore:
        return IndexStore(
            root, embedder.encode, embedder.dim, "minilm", chunk_words=40, chunk_overlap_words=10,
            **kw,
        )  # fmt: skip

    return build
