"""Text primitives shared by the chunker and the reasoning: sentences, and the names, numbers and
dates a sentence asserts.

Sentences come from `sentencex` (Wikimedia's segmenter, rule sets per language): it keeps
abbreviations, initials and decimals inside their sentence ("L.A. Confidential", "J. R. R.
Tolkien", "3.5 percent in the U.S."), which a full-stop regex cuts. Its segments are lossless
(they join back to the text), so markers can be placed by position.

The names are found by hand: no named-entity model can ship in the wheel and run offline in
microseconds per answer, and what the support check needs is not a typed entity but "a capitalised
phrase, a number or a date the answer asserts", which spelling finds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sentencex import segment


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Sentences without surrounding whitespace; paragraph breaks end a sentence."""
    return [s.strip() for s in segment(language, text) if s.strip()]


def sentence_spans(text: str, language: str = "en") -> list[tuple[int, int]]:
    """(start, end) of each sentence in `text`, trailing whitespace excluded."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for piece in segment(language, text):
        start, end = pos, pos + len(piece)
        pos = end
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + lead + len(stripped)))
    return spans


# A capitalised word (Latin capitals, accented too: "Östersund"), or an initial ("L.", "J.").
_UPPER = "A-ZÀ-ÖØ-Þ"
_CAP = rf"(?:[{_UPPER}]\.(?:[{_UPPER}]\.)*|[{_UPPER}][\w'’-]*)"
# Names of several words may be joined by these ("Bank of England", "Leonardo da Vinci").
_JOIN = r"(?:of|de|da|del|della|di|du|la|le|von|van|der|den|the|and|&|y|bin|al)"
NAME = re.compile(rf"{_CAP}(?:\s+(?:{_JOIN}\s+)?{_CAP})*")
# 1987, 3.5, 1,200, 30%, 1980s, 21st: the digits are what must match.
NUMBER = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_WORD = re.compile(r"[\w'’]+")

NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
# Capitalised at the start of a sentence without being a name.
_FUNCTION_WORDS = frozenset(
    "a an the this that these those it its he she they we i you his her their our your there "
    "in on at by for from of to with as and but or so if when where while who whom whose what "
    "which why how yes no not also however therefore thus according answer question passage "
    "passages source sources based although because after before during since until".split()
)


@dataclass(frozen=True)
class Claim:
    """A name, number or date an answer asserts, as written and as matched."""

    text: str
    # "name"; "number"; "opening": one capitalised word opening a sentence, a name or not
    # ("Tallinn [1].", "Founded in …"), matched by its stem so that a plain word passes.
    kind: str
    key: tuple[str, ...]  # lower-cased words (names), normalised digits (numbers)


STEM = 5  # characters of a word compared for an "opening" claim: found ~ founded ~ founding


def _norm(word: str) -> str:
    """Lower case, without a possessive ("Quen's" is Quen)."""
    w = word.lower()
    return w[:-2] if w.endswith(("'s", "’s")) else w


def _number_key(raw: str) -> str:
    digits = raw.replace(",", "")
    return digits.rstrip("0").rstrip(".") if "." in digits else digits


def claims(text: str) -> list[Claim]:
    """Names and numbers asserted by `text` (citation markers already removed)."""
    out: list[Claim] = []
    for start, end in sentence_spans(text):
        sentence = text[start:end]
        for m in NAME.finditer(sentence):
            words = _WORD.findall(m.group(0).replace(".", " "))
            opens = not sentence[: m.start()].strip(" \"'(“‘")
            if opens and words[0].lower() in _FUNCTION_WORDS:
                words = words[1:]
            elif opens and len(words) == 1:
                out.append(Claim(words[0], "opening", (_norm(words[0]),)))
                continue
            key = tuple(
                _norm(w)
                for w in words
                if w.lower() not in _FUNCTION_WORDS and not re.fullmatch(_JOIN, w.lower())
            )
            if key:
                out.append(Claim(" ".join(words), "name", key))
        for m in NUMBER.finditer(sentence):
            out.append(Claim(m.group(0), "number", (_number_key(m.group(0)),)))
    return out


@dataclass(frozen=True)
class Evidence:
    """What a set of passages states, indexed for `supports`."""

    words: frozenset[str]
    stems: frozenset[str]
    numbers: frozenset[str]

    @classmethod
    def of(cls, *texts: str) -> Evidence:
        joined = " ".join(texts)
        words = {_norm(w) for w in _WORD.findall(joined.replace(".", " "))}
        numbers = {_number_key(m.group(0)) for m in NUMBER.finditer(joined)}
        numbers |= {NUMBER_WORDS[w] for w in words if w in NUMBER_WORDS}
        return cls(frozenset(words), frozenset(w[:STEM] for w in words), frozenset(numbers))

    def supports(self, claim: Claim) -> bool:
        if claim.kind == "number":
            return claim.key[0] in self.numbers
        if claim.kind == "opening":
            return claim.key[0][:STEM] in self.stems
        return all(w in self.words for w in claim.key)
