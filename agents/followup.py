"""Follow-up questions: the question retrieval searches for when a chat has earlier turns.

"Where was it invented?" alone retrieves nothing about what "it" is. The SLM rewrites the
question with the conversation in view; where its rewrite is unusable, the previous user question
is searched together with the new one, which keeps the names a follow-up leaves out.
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


def parse_condensed(text: str, question: str) -> str | None:
    """The model's rewrite as one question, or None when it is not one (empty, a refusal, an
    answer rambling on)."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip("\"'“”").strip()
    if not line or len(line) > 3 * len(question) + 120:
        return None
    if line.lower().startswith(("i ", "i'm", "sorry", "the conversation")):
        return None
    return line
