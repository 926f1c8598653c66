"""Answer and ranking metrics: SQuAD's EM/F1 normalisation, recall@k, AUROC."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

from hybrid_serve.agents.citations import strip_markers


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 official normalisation: lower, drop punctuation, articles and extra spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: Iterable[str]) -> float:
    """Best token-level F1 over the gold answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        g = normalize_answer(gold).split()
        common = Counter(pred) & Counter(g)
        same = sum(common.values())
        if same == 0:
            continue
        precision, recall = same / len(pred), same / len(g)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def strip_citations(text: str) -> str:
    return strip_markers(text)


def recall_at_k(ranked: Sequence[str], gold: set[str], k: int) -> float:
    """Share of the gold items found in the top k (1.0 when all gold items are there)."""
    if not gold:
        return 0.0
    return len(gold.intersection(ranked[:k])) / len(gold)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))
