"""Citation markers: parse `[n]`, drop dangling ones, attribute uncited claims, renumber.

A small model often forgets markers or invents numbers; the contract is that every number in the
answer points at an entry of `citations`, so the text is repaired here rather than trusted.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence

from hybrid_serve.schemas import Citation, Passage
from hybrid_serve.text import sentence_spans, split_sentences

MARKER = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be been by for from has have in is it its of on or that the this to was "
    "were which who with what when where why how did does do not no yes i you he she they we "
    "his her their our your there than then so such these those can could would should may "
    "might will shall also into about over under after before".split()
)

SNIPPET_CHARS = 240


def strip_markers(text: str) -> str:
    """The text without its citation markers."""
    return re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"\s*" + MARKER.pattern, "", text)).strip()


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def support(claim: str, evidence: str) -> float:
    """Share of the claim's content words found in the evidence (0-1): cheap lexical entailment."""
    return _share(claim_words(claim), content_words(evidence))


def claim_words(claim: str) -> set[str]:
    return content_words(MARKER.sub(" ", claim))


def _share(words: set[str], evidence: set[str]) -> float:
    return len(words & evidence) / len(words) if words else 0.0


def markers(text: str) -> list[int]:
    """Citation numbers in order of appearance, `[1, 3]` counted as 1 then 3."""
    out: list[int] = []
    for m in MARKER.finditer(text):
        out.extend(int(n) for n in re.split(r"\s*,\s*", m.group(1)))
    return out


def _snippet(passage: Passage, claim: str) -> str:
    """The passage sentence that best supports the claim, else its opening."""
    sentences = split_sentences(passage.text)
    best = max(sentences, key=lambda s: support(claim, s), default=passage.text) if claim else ""
    text = best if best and support(claim, best) > 0 else passage.text
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rstrip() + "…"


def attribute(text: str, passages: Sequence[Passage], min_support: float = 0.5) -> str:
    """Add a marker to each uncited sentence that one passage clearly supports."""
    if not passages:
        return text
    out: list[str] = []
    evidence = [content_words(p.text) for p in passages]  # once, not once a sentence
    for sentence in split_sentences(text):
        if markers(sentence):
            out.append(sentence)
            continue
        words = claim_words(sentence)
        scores = [_share(words, e) for e in evidence]
        best = max(range(len(passages)), key=scores.__getitem__)
        if scores[best] >= min_support:
            stripped = sentence.rstrip()
            tail = ""
            if stripped and stripped[-1] in ".!?":
                stripped, tail = stripped[:-1], stripped[-1]
            sentence = f"{stripped} [{best + 1}]{tail}"
        out.append(sentence)
    return " ".join(out)


def _claim_before(text: str, starts: Sequence[int], pos: int) -> str:
    """The sentence a marker at `pos` closes: from the last sentence start before it ("…
    Tallinn. [1]" cites the sentence it follows). `starts`: the text's sentence starts, found
    once for every marker (splitting the text up to each marker again was quadratic)."""
    i = bisect_left(starts, pos)
    return text[starts[i - 1] : pos] if i else ""


def _citation(number: int, passage: Passage, claim: str) -> Citation:
    return Citation(
        number=number,
        doc_id=passage.doc_id,
        collection=passage.collection,
        title=passage.title,
        snippet=_snippet(passage, claim),
        score=round(float(passage.score), 6),
    )


def as_numbered(text: str, passages: Sequence[Passage]) -> list[Citation]:
    """Citations for the markers already in `text`, keeping the model's own numbers (for text
    already streamed, which can no longer be renumbered); numbers with no passage are left out."""
    out: dict[int, Citation] = {}
    starts = [start for start, _ in sentence_spans(text)]
    for m in MARKER.finditer(text):
        for raw in re.split(r"\s*,\s*", m.group(1)):
            n = int(raw)
            if 1 <= n <= len(passages) and n not in out:
                out[n] = _citation(n, passages[n - 1], _claim_before(text, starts, m.start()))
    return list(out.values())


def finalize(
    text: str, passages: Sequence[Passage], attribute_uncited: bool = True
) -> tuple[str, list[Citation]]:
    """Answer text with markers renumbered 1..m in order of first use, and the m citations.

    `passages[i]` is the passage the model saw as `[i+1]`. Markers outside that range are removed.
    Two passages of the same document chunk are distinct citations; the same chunk is one.
    """
    text, citations, _ = finalize_sources(text, passages, attribute_uncited)
    return text, citations


def finalize_sources(
    text: str, passages: Sequence[Passage], attribute_uncited: bool = True
) -> tuple[str, list[Citation], list[Passage]]:
    """`finalize`, plus the passage behind each citation (for merging answers by chunk)."""
    text = text.strip()
    if attribute_uncited:
        text = attribute(text, passages)

    number_of_chunk: dict[str, int] = {}
    cited: list[tuple[Passage, str]] = []

    starts = [start for start, _ in sentence_spans(text)]

    def renumber(match: re.Match[str]) -> str:
        claim = _claim_before(text, starts, match.start())
        new: list[int] = []
        for raw in re.split(r"\s*,\s*", match.group(1)):
            n = int(raw)
            if not 1 <= n <= len(passages):
                continue
            passage = passages[n - 1]
            if passage.key not in number_of_chunk:
                number_of_chunk[passage.key] = len(cited) + 1
                cited.append((passage, claim))
            k = number_of_chunk[passage.key]
            if k not in new:
                new.append(k)
        return "".join(f"[{k}]" for k in new)

    text = MARKER.sub(renumber, text)
    text = re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"[ \t]{2,}", " ", text)).strip()
    citations = [_citation(i + 1, p, claim) for i, (p, claim) in enumerate(cited)]
    return text, citations, [p for p, _ in cited]
