"""Every policy decision, in one place: where data may go (the one definition of "sensitive",
and the gate every call to the LLM tier passes), whether the LLM tier may be used for a request,
whether an answer is verified, and what the answer cache may read and keep.

A request is sensitive when it says so, when its text matches a `policies.sensitive_patterns`
regex, or the moment any retrieval made for it (the first, a rewrite's, a sub-task's, a
follow-up's check of the earlier turns) returns a passage of a document tagged with one of
`policies.sensitive_tags` (case-insensitively); from then on nothing it produced may reach a
hosted tier. The pipeline decides early, to skip work that could not be sent; `PrivacyGate`
decides last, inside the gateway that sends, on the whole content of the call, so that a code
path that forgets to ask is still stopped. An on-premises tier (`llm.on_premises`) is inside
the cluster and may take sensitive requests.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hybrid_serve.agents.citations import support
from hybrid_serve.agents.interfaces import LLMCall
from hybrid_serve.config import HybridServeConfig, PolicyConfig
from hybrid_serve.schemas import AnswerRequest, AnswerResponse, Collections, Passage, Route

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


def call_texts(call: LLMCall) -> list[str]:
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

    def why_not(self, call: LLMCall) -> str | None:
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

    def check(self, call: LLMCall) -> str | None:
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


class Policy:
    """The decisions the pipeline and the ingress make from the configuration in force."""

    def __init__(self, cfg: HybridServeConfig) -> None:
        self.cfg = cfg
        self.sensitivity = Sensitivity(cfg.policies)

    def wants_verification(self, req: AnswerRequest, route: Route) -> bool:
        """`always`, `never`, or (`auto`) every answer the SLM did not keep on its own."""
        policy = req.verify or self.cfg.escalation.verify
        if policy == "auto":
            return route != "slm"
        return policy == "always"

    @staticmethod
    def llm_down(tier: Mapping[str, Any], key_budget_exhausted: bool) -> str | None:
        """Why the LLM tier may not be used for a request, known before it starts: no key (or no
        proxy to call it), or the caller's key over its daily budget. The tier's circuit and
        budget are checked call by call where it is called."""
        if tier.get("reason") == "no_api_key" or not tier.get("ready", True):
            return "claude_unavailable"
        if key_budget_exhausted:
            return "key_budget_exhausted"
        return None

    def may_use_cache(self, req: AnswerRequest, no_cache_header: bool) -> bool:
        """Read (and later fill) the answer cache for this request: on, not refused by the client,
        and not sensitive unless `cache.sensitive`."""
        c = self.cfg.cache
        allowed = c.sensitive or not self.sensitivity.request(req)
        return c.enabled and not no_cache_header and req.use_cache and allowed

    def may_keep(self, answer: AnswerResponse, llm_down: str | None) -> bool:
        """Cache a fresh answer: complete (not cut by the deadline, not degraded by a passing
        failure — a reason known before it started is no passing failure), not empty, and not
        sensitive unless `cache.sensitive`."""
        cut = answer.deadline is not None and bool(answer.deadline.cut)
        transient = set(answer.degraded) - {llm_down}
        sensitive_ok = not answer.sensitive or self.cfg.cache.sensitive
        return not cut and not transient and bool(answer.answer.strip()) and sensitive_ok

    @staticmethod
    def cache_scope(
        kind: str,
        req: AnswerRequest,
        llm_down: str | None,
        collections: Collections,
        history: Sequence[dict[str, str]] = (),
        **options: Any,
    ) -> str:
        """Everything besides the question that shapes an answer: an entry serves only requests
        that agree on all of it — the options, the conversation before the question (by digest),
        and the collections the caller may read, so an answer is only ever reused for a caller
        who could have retrieved its evidence."""
        turns = json.dumps(list(history), sort_keys=True).encode()
        return json.dumps(
            {
                "kind": kind,
                "mode": req.mode,
                "verify": req.verify,
                "sensitive": req.sensitive,
                "pii": req.pii,
                "top_k": req.top_k,
                "claude": llm_down,
                "history": hashlib.sha256(turns).hexdigest() if history else None,
                "collections": sorted(collections) if collections is not None else None,
                **options,
            },
            sort_keys=True,
        )
