"""Merging cited partial answers into one: citations renumbered across sub-answers, the same
passage cited by two sub-agents becoming one citation, no number without an entry."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from agents.schemas import Citation, Passage

_MARKER = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass
class PartialAnswer:
    """A sub-agent's answer; `sources[i]` is the passage behind its citation number i+1."""

    id: str
    question: str
    text: str
    citations: list[Citation]
    sources: list[Passage]
    status: str = "ok"
    latency_ms: float = 0.0
    passages: list[Passage] = field(default_factory=list)
    confidence: float = 0.0
    error: str = ""
    exception: BaseException | None = None


def merge(parts: Sequence[PartialAnswer]) -> tuple[str, list[Citation], list[Passage]]:
    """(merged text, citations 1..m, the passage behind each citation)."""
    number: dict[str, int] = {}
    citations: list[Citation] = []
    sources: list[Passage] = []
    sentences: list[str] = []
    for part in parts:
        if part.status != "ok" or not part.text.strip():
            continue
        local = {
            c.number: (c, part.sources[c.number - 1])
            for c in part.citations
            if 1 <= c.number <= len(part.sources)
        }

        def renumber(m: re.Match[str], local: dict = local) -> str:
            out: list[int] = []
            for raw in re.split(r"\s*,\s*", m.group(1)):
                hit = local.get(int(raw))
                if hit is None:
                    continue
                cite, passage = hit
                if passage.chunk_id not in number:
                    number[passage.chunk_id] = len(citations) + 1
                    citations.append(cite.model_copy(update={"number": len(citations) + 1}))
                    sources.append(passage)
                n = number[passage.chunk_id]
                if n not in out:
                    out.append(n)
            return "".join(f"[{n}]" for n in out)

        sentences.append(_MARKER.sub(renumber, part.text.strip()))
    missing = [p for p in parts if p.status != "ok"]
    text = " ".join(sentences)
    if missing:
        gaps = "; ".join(f"{p.question} ({p.status})" for p in missing)
        text = (text + " " if text else "") + f"Not answered: {gaps}."
    return text.strip(), citations, sources
