"""What the session's Ray cluster has written to its log directory (replicas' stderr included).

The shared cluster is started with its own temporary directory (`start_dir`), so its logs are
found by that path alone, without Ray's private state."""

from __future__ import annotations

import tempfile
from pathlib import Path

_temp_dir: Path | None = None


def start_dir() -> str:
    """A fresh directory for `ray.init(_temp_dir=...)`, short enough for Ray's socket paths."""
    global _temp_dir
    _temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    return str(_temp_dir)


def ray_log_lines() -> list[str]:
    """Every line of every file under the running cluster's log directory."""
    if _temp_dir is None:
        raise RuntimeError("the shared cluster was not started with start_dir()")
    lines: list[str] = []
    for path in (_temp_dir / "session_latest" / "logs").rglob("*"):
        if path.is_file():
            lines.extend(path.read_text(errors="replace").splitlines())
    return lines
