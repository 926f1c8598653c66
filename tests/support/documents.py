"""Documents for tests that need more text than a model's context holds."""

from __future__ import annotations

WORDS = "owl river stone cloud lamp field bread tower song glass".split()


def long_documents(prefix: str, word: str, n: int) -> list[dict[str, str]]:
    """`n` documents of ten sentences each, every one naming `word` (a made-up term no other
    document has) and sixteen common words, so that a question about `word` retrieves them all."""
    title = word.capitalize()
    return [
        {
            "id": f"{prefix}-{i}",
            "title": f"{title} log {i}",
            "text": " ".join(
                f"{title} entry {i}.{j} lists "
                f"{' '.join(WORDS[(i + j + k) % len(WORDS)] for k in range(16))}."
                for j in range(10)
            ),
        }
        for i in range(n)
    ]
