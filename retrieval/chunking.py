"""Chunking with overlap: passages small enough to cite precisely, large enough to answer from."""

from __future__ import annotations

import re

from hybrid_serve.text import split_sentences

_PARAGRAPH = re.compile(r"\n\s*\n")


def _units(text: str) -> list[list[str]]:
    """Sentences as word lists; paragraph breaks also end a sentence."""
    units: list[list[str]] = []
    for para in _PARAGRAPH.split(text):
        for sentence in split_sentences(para):
            words = sentence.split()
            if words:
                units.append(words)
    return units


def chunk_text(
    text: str, chunk_words: int = 180, overlap_words: int = 40, chunk_chars: int = 4000
) -> list[str]:
    """Split into chunks of at most `chunk_words` words that start on a sentence boundary where
    possible; consecutive chunks share about `overlap_words` words so that a fact cut by a
    boundary still appears whole in one chunk. No chunk is longer than `chunk_chars`: a chunk of
    very long "words" (text without spaces) is cut again, without overlap."""
    if chunk_words <= 0 or overlap_words < 0 or overlap_words >= chunk_words:
        raise ValueError("need chunk_words > overlap_words >= 0")
    units: list[list[str]] = []
    for words in _units(text):
        # A sentence longer than a chunk is cut into windows with the same overlap.
        step = chunk_words - overlap_words
        if len(words) <= chunk_words:
            units.append(words)
        else:
            units.extend(
                words[i : i + chunk_words] for i in range(0, len(words) - overlap_words, step)
            )
    chunks: list[str] = []
    start = 0
    while start < len(units):
        size = 0
        end = start
        while end < len(units) and (size + len(units[end]) <= chunk_words or end == start):
            size += len(units[end])
            end += 1
        chunks.extend(_at_most(" ".join(w for u in units[start:end] for w in u), chunk_chars))
        if end >= len(units):
            break
        # Step back over whole sentences worth at most `overlap_words` words.
        back, shared = end, 0
        while back - 1 > start and shared + len(units[back - 1]) <= overlap_words:
            back -= 1
            shared += len(units[back])
        start = back
    return chunks


def _at_most(chunk: str, chars: int) -> list[str]:
    """`chunk` in pieces of at most `chars` characters, cut between words where it can be."""
    if len(chunk) <= chars:
        return [chunk]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for word in chunk.split(" "):
        for part in (word[i : i + chars] for i in range(0, len(word), chars)):
            if current and size + 1 + len(part) > chars:
                pieces.append(" ".join(current))
                current, size = [], 0
            size += len(part) + (1 if current else 0)
            current.append(part)
    if current:
        pieces.append(" ".join(current))
    return pieces
