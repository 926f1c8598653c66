"""What the engines remember per machine (llama.cpp set-ups and conversions, engine
measurements): where, and written so that a reader never sees half a record."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def user_cache_dir() -> Path:
    """`hybrid-serve` in the user's cache (XDG_CACHE_HOME, else ~/.cache), shared by every data
    dir on the machine."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hybrid-serve"


def write_record(path: Path, text: str) -> None:
    """A file of its own beside `path`, then one rename: writers starting together each write
    whole records, and a reader (doctor) never sees half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}-", suffix=".part", delete=False
    ) as tmp:
        tmp.write(text)
    Path(tmp.name).replace(path)
