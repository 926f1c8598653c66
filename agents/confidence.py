"""Confidence in an SLM answer from cheap signals: no extra model call, no extra forward pass.

Each signal is in 0-1. The score is their weighted mean, capped by hard failure signs (a refusal,
nothing retrieved). Every signal that falls below its floor names an escalation reason, so a
response can say *why* it escalated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hybrid_serve.agents.citations import content_words, markers, strip_markers, support
from hybrid_serve.schemas import Citation, Passage
from hybrid_serve.text import Evidence, claims, split_sentences

_REFUSAL = re.compile(
    r"\b(i don'?t know|i do not know|not (?:mentioned|stated|provided|given|specified)|"
    r"no information|cannot (?:answer|determine|find)|can'?t (?:answer|determine|find)|"
    r"unable to|(?:does|do) not (?:say|mention|contain|provide)|unknown)\b",
    re.IGNORECASE,
)
_COMPARISON = re.compile(
    r"\b(compare|comparison|versus|vs\.?|differ(?:ence|ent)?|which (?:is|was|one|of)|"
    r"more|less|older|younger|larger|smaller|bigger|earlier|later|both|same)\b",
    re.IGNORECASE,
)
_AMBIGUOUS = re.compile(
    r"^\s*(?:what about|and|how about|it|this|that|they|he|she)\b"
    r"|\b(?:it|this|that|they)\s*\?$",
    re.IGNORECASE,
)
_WH = re.compile(r"\b(who|what|when|where|which|why|how)\b", re.IGNORECASE)

# Weights of the signals in the combined score; they sum to 1.
WEIGHTS = {"token": 0.30, "retrieval": 0.20, "margin": 0.05, "support": 0.30, "cited": 0.15}
# Below these, a signal names an escalation reason.
FLOORS = {"token": 0.55, "retrieval": 0.5, "support": 0.5}


@dataclass
class QueryShape:
    questions: int
    comparison: bool
    ambiguous: bool
    words: int

    @property
    def multi_part(self) -> bool:
        return self.questions > 1

    @property
    def complex(self) -> bool:
        return self.multi_part or self.comparison


@dataclass
class Confidence:
    score: float
    signals: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def query_shape(query: str) -> QueryShape:
    q = query.strip()
    # "Who X and when Y?" counts as two; so does "A? B?".
    marks = q.count("?")
    wh_clauses = len(re.findall(r"\b(?:and|;)\s+(?:who|what|when|where|which|why|how)\b", q, re.I))
    return QueryShape(
        questions=max(1, marks, 1 + wh_clauses),
        comparison=bool(_COMPARISON.search(q)),
        ambiguous=bool(_AMBIGUOUS.search(q)) or len(content_words(q)) <= 1,
        words=len(q.split()),
    )


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


def retrieval_margin(passages: Sequence[Passage]) -> float:
    """How clearly the best passage beats the runner-up (0: a tie, 1: far ahead)."""
    dense = sorted((p.dense_score for p in passages if p.dense_score is not None), reverse=True)
    if len(dense) < 2:
        return 1.0 if dense else 0.0
    return min(1.0, max(0.0, (dense[0] - dense[1]) / 0.15))


def support_confidence(
    answer: str, cited: Sequence[Citation], passages: Sequence[Passage]
) -> float:
    """Mean lexical support of each answer sentence by the passages it cites."""
    sentences = split_sentences(answer)
    if not sentences or not cited:
        return 0.0
    evidence = _evidence_by_citation(cited, passages)
    scores = []
    for s in sentences:
        nums = [n for n in markers(s) if n in evidence]
        scores.append(max((support(s, evidence[n]) for n in nums), default=0.0))
    return sum(scores) / len(scores)


def _evidence_by_citation(cited: Sequence[Citation], passages: Sequence[Passage]) -> dict[int, str]:
    by_doc: dict[str, list[str]] = {}
    for p in passages:
        by_doc.setdefault(p.doc_id, []).append(p.text)
    return {c.number: " ".join(by_doc.get(c.doc_id, [c.snippet])) for c in cited}


def unsupported_claims(
    query: str, answer: str, cited: Sequence[Citation], passages: Sequence[Passage]
) -> tuple[int, list[str]]:
    """(names and numbers the answer asserts, those that neither the passages a sentence cites
    nor the question state). A sentence without a marker is held to all the cited passages; with
    no citation at all, to every retrieved passage. "Tallinn, Turkey" from a passage that says
    Tallinn is a sentence with good lexical support and one unsupported name."""
    evidence = _evidence_by_citation(cited, passages)
    every = Evidence.of(query, " ".join(evidence.values()) or " ".join(p.text for p in passages))
    total, unsupported = 0, []
    for sentence in split_sentences(answer):
        nums = [n for n in markers(sentence) if n in evidence]
        source = Evidence.of(query, *(evidence[n] for n in nums)) if nums else every
        for claim in claims(strip_markers(sentence)):
            total += 1
            if not source.supports(claim) and claim.text not in unsupported:
                unsupported.append(claim.text)
    return total, unsupported


def is_refusal(answer: str) -> bool:
    return bool(_REFUSAL.search(answer)) or not answer.strip()


def too_short(answer: str, shape: QueryShape) -> bool:
    """An answer with fewer content words than the question has parts cannot answer it."""
    words = content_words(re.sub(r"\[\d+\]", " ", answer))
    return len(words) < max(1, shape.questions) or (shape.comparison and len(words) < 2)


def copied_share(answer: str, passages: Sequence[Passage], n: int = 8) -> float:
    """Share of the answer's word n-grams found verbatim in one passage: near 1 when the answer
    is a passage pasted back rather than an answer to the question."""
    words = strip_markers(answer).lower().split()
    if len(words) < n:
        return 0.0
    grams = {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    best = 0.0
    for p in passages:
        pw = p.text.lower().split()
        found = grams & {tuple(pw[i : i + n]) for i in range(len(pw) - n + 1)}
        best = max(best, len(found) / len(grams))
    return best


# An answer this long and this much a copy of one passage is marked `copied_passage`.
COPIED_WORDS, COPIED_SHARE = 30, 0.8
# Score factors for the signs a kept answer is wrong or not an answer.
PENALTY = {
    "unsupported_entity": 0.6,
    "prompt_echo": 0.8,
    "copied_passage": 0.85,
    "repetition": 0.8,
    "multi_part_query": 0.7,
    "comparison_query": 0.85,
    "ambiguous_query": 0.8,
    "long_query": 0.9,
}


def score_answer(
    query: str,
    answer: str,
    citations: Sequence[Citation],
    passages: Sequence[Passage],
    token_logprobs: Sequence[float] | None,
    echoed: bool = False,
    penalties: Mapping[str, float] = PENALTY,
    looped: bool = False,
    recited: bool = False,
) -> Confidence:
    """`token_logprobs` None means the answer did not come from the SLM (no token signal);
    `echoed`: prompt structure was stripped from the model's text (`prompts.strip_echo`);
    `looped`: the SLM was stopped repeating itself (`slm.repetition_detection`), a model that
    lost the thread; `recited`: it was stopped copying a passage out (`slm.max_recited_words`),
    which is `copied_passage` however short the answer it left."""
    shape = query_shape(query)
    asserted, unsupported = unsupported_claims(query, answer, citations, passages)
    signals = {
        "retrieval": retrieval_confidence(passages),
        "margin": retrieval_margin(passages),
        "support": support_confidence(answer, citations, passages),
        "cited": 1.0 if citations else 0.0,
        "entities": 1.0 - len(unsupported) / asserted if asserted else 1.0,
    }
    weights = dict(WEIGHTS)
    if token_logprobs is None:
        del weights["token"]
    else:
        signals["token"] = token_confidence(token_logprobs)
    score = sum(weights[k] * signals[k] for k in weights) / sum(weights.values())

    reasons = []
    if "token" in signals and signals["token"] < FLOORS["token"]:
        reasons.append("low_token_confidence")
    if not passages:
        reasons.append("empty_retrieval")
        score = min(score, 0.1)
    elif signals["retrieval"] < FLOORS["retrieval"]:
        reasons.append("weak_retrieval")
    if not citations:
        reasons.append("no_citation")
    elif signals["support"] < FLOORS["support"]:
        reasons.append("unsupported_claims")
    if is_refusal(answer):
        reasons.append("refusal")
        score = min(score, 0.2)
    elif too_short(answer, shape):
        reasons.append("short_answer")
        score = min(score, 0.4)
    # A name or number no cited passage states is the commonest wrong answer that reads well.
    if unsupported:
        reasons.append("unsupported_entity")
    if echoed:
        reasons.append("prompt_echo")
    if looped:
        reasons.append("repetition")
    words = len(strip_markers(answer).split())
    if recited or (words >= COPIED_WORDS and copied_share(answer, passages) >= COPIED_SHARE):
        reasons.append("copied_passage")
    # The query's shape lowers the score: a small model fails these more often.
    if shape.multi_part:
        reasons.append("multi_part_query")
    if shape.comparison:
        reasons.append("comparison_query")
    if shape.ambiguous:
        reasons.append("ambiguous_query")
    if shape.words > 40:
        reasons.append("long_query")
    for reason in reasons:
        score *= penalties.get(reason, 1.0)
    signals = {k: round(v, 4) for k, v in signals.items()}
    return Confidence(score=round(min(1.0, max(0.0, score)), 4), signals=signals, reasons=reasons)
