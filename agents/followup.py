"""Follow-up questions: the question retrieval searches for when a chat has earlier turns.

"Where was it invented?" alone retrieves nothing about what "it" is. Claude (or a capable SLM)
rewrites the question with the conversation in view; where there is no usable rewrite, the previous
user question is searched together with the new one, which keeps the names a follow-up leaves
out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PREFIX = re.compile(
    r"^\s*(?:rewritten question|standalone question|question|rewritten|answer)\s*:\s*", re.I
)


def earlier_user_turns(history: Sequence[dict[str, str]]) -> list[str]:
    return [m["content"] for m in history if m.get("role") == "user" and m.get("content")]


def is_follow_up(history: Sequence[dict[str, str]]) -> bool:
    return bool(earlier_user_turns(history))


def with_previous(history: Sequence[dict[str, str]], question: str) -> str:
    """The previous user question, then this one: the fallback search."""
    previous = earlier_user_turns(history)
    return f"{previous[-1].strip()} {question.strip()}" if previous else question


# Words a rewrite may replace: the references it resolves, and the glue around them.
_REFERENCES = frozenset(
    "it its it's they them their theirs he him his she her hers this that these those there "
    "then one ones the a an of in on at to for by with and or is are was were be do does "
    "did".split()
)
_WORDS = re.compile(r"[a-z0-9]+", re.I)


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORDS.findall(text)} - _REFERENCES


def parse_condensed(text: str, question: str) -> str | None:
    """The model's rewrite as one question, or None when it is not one: it must be a question and
    keep what the follow-up asks (at least half of its own content words). Small models often
    answer instead of rewriting, or restate the conversation: SmolLM2-135M did in 52 % of the
    follow-ups of `benchmarks/followups.py`."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip("\"'“”").strip()
    if not line.endswith("?") or len(line) > 3 * len(question) + 120:
        return None
    asked = content_words(question)
    if asked and len(asked & content_words(line)) < 0.5 * len(asked):
        return None
    return line
