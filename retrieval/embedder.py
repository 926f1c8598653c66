"""Sentence embeddings for dense retrieval, loaded from disk only (no hub access at run time)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hybrid_serve.bundled import bundled_embedding_model


def resolve_device(device: str) -> str:
    """`auto`: CUDA when this process sees a GPU (a Ray replica sees only the GPUs it asked for),
    else the CPU. `cuda` without a GPU is an error, not a silent slow fallback."""
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise RuntimeError("retriever.device is cuda but torch sees no CUDA GPU in this process")
    return "cpu"


class Embedder:
    def __init__(
        self, model_dir: str | Path | None = None, batch_size: int = 32, device: str = "cpu"
    ) -> None:
        # Set before sentence-transformers is imported: its hub client reads these at import.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from sentence_transformers import SentenceTransformer

        self.model_dir = Path(model_dir) if model_dir else bundled_embedding_model()
        self.device = resolve_device(device)
        self.model = SentenceTransformer(str(self.model_dir), device=self.device)
        self.batch_size = batch_size
        dim_of = getattr(self.model, "get_embedding_dimension", None)
        dim = dim_of() if dim_of else self.model.get_sentence_embedding_dimension()
        if dim is None:
            raise RuntimeError(f"{self.model_dir}: the model does not say its embedding size")
        self.dim = int(dim)
        self.name = self.model_dir.name if model_dir else "all-MiniLM-L6-v2"
        # torch modules are not documented as safe for concurrent forward passes.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors, so inner product is cosine similarity."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)
