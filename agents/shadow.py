"""Shadow verification: a share of the answers kept on the SLM is graded by Claude after the
response has gone, so the error rate of what users get without escalation is measured on real
traffic, not only on a benchmark.

Each verdict is a line of JSON in a log (one file per orchestrator replica under
`data_dir/shadow/`, appended, never rewritten), the source of `hybrid-serve calibrate --from-log`;
and a count in `hybrid_serve_shadow_verdicts_total{verdict}`, from which the dashboard computes the
rate and its interval (counters add up across replicas; per-replica estimates would not).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hybrid_serve.agents.calibration import clopper_pearson_upper


@dataclass(frozen=True)
class Verdict:
    """Claude's grade of an answer the SLM kept: `wrong` when below the verification bar."""

    at: float
    trace_id: str
    confidence: float
    threshold: float  # the escalation threshold in force: verdicts exist only above it
    score: float
    wrong: bool


class VerdictLog:
    """Appends verdicts to `path`; whole lines under a lock, so a reader never sees half of one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, verdict: Verdict) -> None:
        line = json.dumps(asdict(verdict), separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())


def read_verdicts(paths: Iterable[Path]) -> list[Verdict]:
    """Every verdict in the files given (folders: every `*.jsonl` inside); a line that does not
    parse (a replica killed mid-write) is skipped."""
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.rglob("*.jsonl")) if p.is_dir() else [p])
    out = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                out.append(Verdict(**json.loads(line)))
            except (ValueError, TypeError):
                continue
    return sorted(out, key=lambda v: v.at)


@dataclass(frozen=True)
class ErrorRate:
    verdicts: int
    wrong: int
    rate: float
    lower: float
    upper: float


def kept_error_rate(verdicts: Sequence[Verdict], confidence: float = 0.95) -> ErrorRate:
    """The kept-answer error rate with a two-sided Clopper–Pearson interval."""
    n = len(verdicts)
    wrong = sum(v.wrong for v in verdicts)
    tail = (1 - confidence) / 2
    upper = clopper_pearson_upper(wrong, n, tail)
    lower = 1.0 - clopper_pearson_upper(n - wrong, n, tail) if n else 0.0
    return ErrorRate(n, wrong, wrong / n if n else 0.0, max(0.0, lower), upper)


def shadow_log_path(data_dir: Path, replica: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in replica) or "replica"
    return data_dir / "shadow" / f"{safe}.jsonl"


def now() -> float:
    return round(time.time(), 3)
