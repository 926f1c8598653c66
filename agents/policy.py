"""Where data may go: the one definition of "sensitive", and the gate every call to the LLM tier
passes.

A request is sensitive when it says so, when its text matches a `policies.sensitive_patterns`
regex, or the moment any retrieval made for it (the first, a rewrite's, a sub-task's, a
follow-up's check of the earlier turns) returns a passage of a document tagged with one of
`policies.sensitive_tags` (case-insensitively); from then on nothing it produced may reach a
hosted tier. The lead decides early, to skip work that could not be sent; `PrivacyGate`
decides last, inside the gateway that sends, on the whole content of the call, so that a code
path that forgets to ask is still stopped. An on-premises tier (`claude.on_premises`) is inside
the cluster and may take sensitive requests.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from hybrid_serve.agents.citations import support
from hybrid_serve.config import PolicyConfig
from hybrid_serve.schemas import AnswerRequest, Passage

if TYPE_CHECKING:
    from hybrid_serve.agents.claude import ClaudeCall

# The degraded reason of a request kept inside the cluster, and of a call the gate refused.
KEPT_LOCAL = "sensitive_local_only"
# An earlier answer in a chat counts as written from a sensitive passage when the passage holds
# at least this share of the answer's content words (names, numbers, terms).
ANSWER_OVERLAP = 0.5


class Sensitivity:
    """What makes data sensitive: a tag of its document, a pattern in its text."""

    def __init__(self, policy: PolicyConfig) -> None:
        self.tags = frozenset(t.casefold() for t in policy.sensitive_tags)
        self.patterns = [re.compile(p, re.IGNORECASE) for p in policy.sensitive_patterns]

    def tagged(self, tags: Iterable[str]) -> bool:
        return any(t.casefold() in self.tags for t in tags)

    def passages(self, passages: Iterable[Passage]) -> bool:
        return any(self.tagged(p.tags) for p in passages)

    def text(self, *texts: str) -> bool:
        return any(p.search(t) for p in self.patterns for t in texts if t)

    def request(self, req: AnswerRequest) -> bool:
        """What is known before any retrieval: the flag and the question's own text."""
        return req.sensitive or self.text(req.query)

    def written_from(self, answer: str, passages: Iterable[Passage]) -> bool:
        """An earlier answer that restates a sensitive passage (`ANSWER_OVERLAP` of its content
        words are in it). The API is stateless, so a follow-up's earlier answers are judged by
        what the server can check itself."""
        return any(
            self.tagged(p.tags) and support(answer, f"{p.title}\n{p.text}") >= ANSWER_OVERLAP
            for p in passages
        )


def call_texts(call: ClaudeCall) -> list[str]:
    """Every text a call carries: the question, a candidate answer, a grader's notes, the chat
    before the question, and each passage's title and text."""
    texts = [call.query, call.answer, call.notes]
    texts += [m.get("content", "") for m in call.history]
    for p in call.passages:
        texts += [p.title, p.text]
    return texts


class PrivacyGate:
    """The last check of a call to the LLM tier, in the gateway that sends it: a hosted tier gets
    nothing from a request marked sensitive (by the caller, or by an earlier refusal of this
    gate for the same request), nothing from a passage with a sensitive tag, nothing that
    matches a sensitive pattern. A refused request is remembered (`max_requests`, `ttl_s`), so
    what it produced is not sent later even by a caller that lost the mark."""

    def __init__(
        self,
        policy: PolicyConfig,
        on_premises: bool,
        max_requests: int = 100_000,
        ttl_s: float = 3600.0,
    ) -> None:
        self.sensitivity = Sensitivity(policy)
        self.on_premises = on_premises
        self.max_requests = max_requests
        self.ttl_s = ttl_s
        self._kept: OrderedDict[str, float] = OrderedDict()
        self.refused = 0

    @staticmethod
    def request_key(request_id: str) -> str:
        """A request's own calls and its background ones (`<trace>:shadow`) share one mark."""
        return request_id.split(":", 1)[0]

    def why_not(self, call: ClaudeCall) -> str | None:
        """Why `call` may not leave the cluster, or None when it may."""
        if self.on_premises:
            return None
        key = self.request_key(call.request_id)
        if call.sensitive:
            return "the request is marked sensitive"
        if self._marked(key):
            return "an earlier call of this request was kept inside the cluster"
        if self.sensitivity.passages(call.passages):
            return "a passage comes from a document with a sensitive tag"
        if self.sensitivity.text(*call_texts(call)):
            return "its text matches a sensitive pattern"
        return None

    def check(self, call: ClaudeCall) -> str | None:
        """`why_not`, remembering a refused request."""
        reason = self.why_not(call)
        if reason is not None:
            self.refused += 1
            self.mark(self.request_key(call.request_id))
        return reason

    def mark(self, key: str) -> None:
        self._kept[key] = time.monotonic() + self.ttl_s
        self._kept.move_to_end(key)
        while len(self._kept) > self.max_requests:
            self._kept.popitem(last=False)

    def _marked(self, key: str) -> bool:
        expires = self._kept.get(key)
        if expires is None:
            return False
        if expires < time.monotonic():
            del self._kept[key]
            return False
        return True


def history_in_use(history: Sequence[dict[str, str]], turns: int) -> list[dict[str, str]]:
    """The earlier turns a request's prompts carry: the last `turns` user and assistant messages,
    and the last user question (the fallback search)."""
    chat = [m for m in history if m.get("role") in ("user", "assistant") and m.get("content")]
    used = chat[-turns:] if turns else []
    last_user = next((m for m in reversed(chat) if m["role"] == "user"), None)
    if last_user is not None and not any(m is last_user for m in used):
        used.insert(0, last_user)
    return used
