"""Confidence in an SLM answer from cheap signals: no extra model call, no extra forward pass."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from agents.citations import markers, split_sentences, support
from agents.schemas import Citation, Passage

_REFUSAL = re.compile(
    r"\b(i don'?t know|i do not know|not (?:mentioned|stated|provided|given|specified)|"
    r"no information|cannot (?:answer|determine|find)|can'?t (?:answer|determine|find)|"
    r"unable to|(?:does|do) not (?:say|mention|contain|provide)|unknown)\b",
    re.IGNORECASE,
)

# Weights of the signals in the combined score; they sum to 1.
WEIGHTS = {"token": 0.35, "retrieval": 0.25, "support": 0.3, "cited": 0.1}


@dataclass
class Confidence:
    score: float
    signals: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


def token_confidence(token_logprobs: Sequence[float]) -> float:
    """Geometric-mean probability of the generated tokens."""
    values = [lp for lp in token_logprobs if math.isfinite(lp)]
    if not values:
        return 0.0
    return math.exp(sum(values) / len(values))


def retrieval_confidence(passages: Sequence[Passage]) -> float:
    """Cosine similarity of the best passage (dense), mapped so that 0.6+ is near certain."""
    dense = [p.dense_score for p in passages if p.dense_score is not None]
    if not dense:
        return 0.0
    return min(1.0, max(0.0, max(dense) / 0.6))


def support_confidence(
    answer: str, cited: Sequence[Citation], passages: Sequence[Passage]
) -> float:
    """Mean lexical support of each answer sentence by the passages it cites."""
    by_doc: dict[str, list[str]] = {}
    for p in passages:
        by_doc.setdefault(p.doc_id, []).append(p.text)
    sentences = split_sentences(answer)
    if not sentences or not cited:
        return 0.0
    evidence = {c.number: " ".join(by_doc.get(c.doc_id, [c.snippet])) for c in cited}
    scores = []
    for s in sentences:
        nums = [n for n in markers(s) if n in evidence]
        scores.append(max((support(s, evidence[n]) for n in nums), default=0.0))
    return sum(scores) / len(scores)


def is_refusal(answer: str) -> bool:
    return bool(_REFUSAL.search(answer)) or not answer.strip()


def score_answer(
    answer: str,
    citations: Sequence[Citation],
    passages: Sequence[Passage],
    token_logprobs: Sequence[float],
) -> Confidence:
    signals = {
        "token": token_confidence(token_logprobs),
        "retrieval": retrieval_confidence(passages),
        "support": support_confidence(answer, citations, passages),
        "cited": 1.0 if citations else 0.0,
    }
    score = sum(WEIGHTS[k] * v for k, v in signals.items())
    flags = []
    if is_refusal(answer):
        flags.append("refusal")
        score = min(score, 0.2)
    if not passages:
        flags.append("empty_retrieval")
        score = min(score, 0.1)
    return Confidence(score=round(min(1.0, max(0.0, score)), 4), signals=signals, flags=flags)
