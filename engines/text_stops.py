"""Stops read from the text as it is written, the same on every engine that reads its own text
(llama.cpp's loop, the wire engines' streams): two ways a small model runs to max_tokens that no
engine's sampling parameters stop (vLLM's stop on strings, tokens and exact repeats of the
output).

- **Recitation** (`GenerationRequest.max_recited_words`): it opens with a passage's label and
  writes the passage out ("[1] (How retrieval works) # How retrieval works Each query is …"),
  which the citation already points to. Stopped once the last that-many words written are a run
  of one passage (case and punctuation aside).
- **A loop that counts** (`GenerationRequest.repetition_detection`, read on words with every
  number masked): "[1] (Question) # How is … [2] (Question) # How is …" or "[1]\\n[2]\\n[3]…" —
  each turn differs from the last only in its numbers, so the token rule (vLLM's, which the
  engines apply to tokens) never sees two equal turns. Finish reason `repetition`, as for a
  loop of equal turns.

Words, not token ids, so that an answer stops at the same word on every engine and tokenizer.
Written by hand: no library checks text for either while it is generated.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence

from hybrid_serve.engines.repetition import Repetition
from hybrid_serve.schemas import FinishReason, GenerationRequest, RepetitionDetection

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class Words:
    """The complete words of a text pushed in pieces: a word is complete once something that is
    not part of a word follows it, so a piece boundary never splits one. Each piece is read
    once; only the pieces of the word still being written are kept (never read again until it
    ends, so a text that is one long word costs no more than any other)."""

    def __init__(self) -> None:
        self._partial: list[str] = []

    def push(self, delta: str) -> list[str]:
        done: list[str] = []
        start = 0
        if not delta:
            return done  # nothing written (a token that ends inside a UTF-8 character)
        if self._partial:
            head = _WORD.match(delta)
            if head is not None and head.end() == len(delta):
                self._partial.append(delta)  # the word goes on past this piece too
                return done
            tail = head.group() if head is not None else ""
            done.append(("".join(self._partial) + tail).lower())
            self._partial = []
            start = head.end() if head is not None else 0
        for match in _WORD.finditer(delta, start):
            if match.end() == len(delta):
                self._partial = [match.group()]  # may go on in the next piece
                break
            done.append(match.group().lower())
        return done


class Recitation:
    """Says when the last `words` words pushed are a run of one passage. Set-up is one pass over
    the passages (each run of `words` words, kept in a set); each word then costs one lookup."""

    def __init__(self, passages: Sequence[str], words: int) -> None:
        self._runs: set[tuple[str, ...]] = set()
        for text in set(passages):
            found = _words(text)
            # Every run of `words` words, built by zip in C: a Python loop per run is 10x slower.
            self._runs.update(zip(*(found[i:] for i in range(words)), strict=False))
        self._recent: deque[str] = deque(maxlen=words)

    def push(self, word: str) -> bool:
        self._recent.append(word)
        return len(self._recent) == self._recent.maxlen and tuple(self._recent) in self._runs


class CountedLoop:
    """vLLM's repetition rule (`Repetition`) on the words written, each number masked: a turn of
    8 to 64 words, by default, written twice back to back however its numbers count."""

    def __init__(self, rule: RepetitionDetection) -> None:
        self._check = Repetition(rule)

    def push(self, word: str) -> bool:
        return self._check.push("#" if word.isdigit() else word)


class TextStops:
    """The stops a request asks for, fed its text as it is written (`push`)."""

    def __init__(self, req: GenerationRequest) -> None:
        self._words = Words()
        recite = req.max_recited_words is not None and bool(req.evidence)
        self.recitation = Recitation(req.evidence, req.max_recited_words or 0) if recite else None
        rule = req.repetition_detection
        self.loop = CountedLoop(rule) if rule is not None else None

    def push(self, delta: str) -> FinishReason | None:
        """Why generation ends with the text so far, `delta` included (None: it goes on)."""
        reason: FinishReason | None = None
        for word in self._words.push(delta):  # every word is read: the checks stay in step
            if self.recitation is not None and self.recitation.push(word):
                reason = reason or "recitation"
            if self.loop is not None and self.loop.push(word):
                reason = reason or "repetition"
        return reason


def asks_text_stops(req: GenerationRequest) -> bool:
    """Whether the request sets either stop (without building the check over its passages)."""
    recite = req.max_recited_words is not None and bool(req.evidence)
    return recite or req.repetition_detection is not None


def text_stops(req: GenerationRequest) -> TextStops | None:
    """The check a request asks for: none when it sets neither stop."""
    return TextStops(req) if asks_text_stops(req) else None
