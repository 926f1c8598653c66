"""Merging cited partial answers into one: citations renumbered across sub-answers, the same
passage cited by two sub-agents becoming one citation, no number without an entry."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from hybrid_serve.agents.citations import MARKER, finalize_sources
from hybrid_serve.schemas import Citation, Passage, SubtaskStatus


@dataclass
class PartialAnswer:
    """A sub-agent's answer; `sources[i]` is the passage behind its citation number i+1."""

    id: str
    question: str
    text: str
    citations: list[Citation]
    sources: list[Passage]
    status: SubtaskStatus = "ok"
    latency_ms: float = 0.0
    passages: list[Passage] = field(default_factory=list)
    confidence: float = 0.0
    error: str = ""
    exception: BaseException | None = None


def merge(parts: Sequence[PartialAnswer]) -> tuple[str, list[Citation], list[Passage]]:
    """(merged text, citations 1..m, the passage behind each citation).

    Each answer's markers are moved into one pool of passages, then renumbered the way a single
    answer is (`finalize_sources`), which also makes one citation of a passage cited twice."""
    pool: list[Passage] = []
    texts: list[str] = []
    for part in parts:
        if part.status != "ok" or not part.text.strip():
            continue
        offset, n = len(pool), len(part.sources)
        pool.extend(part.sources)

        def shift(m: re.Match[str], offset: int = offset, n: int = n) -> str:
            local = (int(x) for x in re.split(r"\s*,\s*", m.group(1)))
            kept = [str(k + offset) for k in local if 1 <= k <= n]
            return f"[{', '.join(kept)}]" if kept else ""

        texts.append(MARKER.sub(shift, part.text.strip()))
    text, citations, sources = finalize_sources(" ".join(texts), pool, attribute_uncited=False)
    missing = [p for p in parts if p.status != "ok"]
    if missing:
        gaps = "; ".join(f"{p.question} ({p.status})" for p in missing)
        text = (text + " " if text else "") + f"Not answered: {gaps}."
    return text.strip(), citations, sources
