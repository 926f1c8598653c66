"""The answer cache's store: a finished answer is reused for the same or a near-identical
question asked under the same conditions, until its TTL passes or the index changes.

Hand-written because what it must know is ours: an entry is valid only for one index version and
one set of request options, a hit is decided by embedding similarity with the retriever's own
embedder (so "What is Ray Serve?" and "what's ray serve" meet), and it must stay bounded. General
caches (cachetools, LiteLLM's semantic cache on Redis) key on exact text or need a vector store
beside them. The lookup is one matrix-vector product over the entries of the request's key that
share the question's signature (see `signature`).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybrid_serve.agents.limits import Clock


def normalise(text: str) -> str:
    """Case and spacing do not make a different question."""
    return " ".join(text.lower().split()).rstrip("?.! ")


_WH = frozenset("who whom whose what which when where why how".split())
_NEGATION = frozenset("not no never without nor cannot".split())
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+(?:[.,]\d+)*")


def signature(text: str) -> tuple[frozenset[str], frozenset[str], bool]:
    """What two questions must share, however similar their embeddings: the question words,
    the numbers, and negation. Sentence embeddings put "Who invented X?" and "Where was X
    invented?" at 0.97 cosine (all-MiniLM-L6-v2), above any useful bar."""
    words = _WORD.findall(text.lower().replace("n't", " not"))
    return (
        frozenset(w for w in words if w in _WH),
        frozenset(w for w in words if w[0].isdigit()),
        any(w in _NEGATION for w in words),
    )


@dataclass
class Entry:
    question: str  # as asked
    text: str
    signature: tuple[frozenset[str], frozenset[str], bool]
    vector: np.ndarray
    answer: dict[str, Any]
    index_version: int
    expires: float
    saved_usd: float
    owner: str = ""  # who asked (an API key's label): only they see its wording on a hit


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    invalidations: int = 0
    saved_usd: float = 0.0


@dataclass
class SemanticCache:
    """Entries grouped by request key (the options that shape an answer), with one LRU order and
    one bound over all of them."""

    max_entries: int = 10_000
    ttl_s: float = 3600.0
    min_similarity: float = 0.95
    clock: Clock = time.monotonic
    index_version: int = 0
    stats: CacheStats = field(default_factory=CacheStats)
    _by_key: dict[str, dict[int, Entry]] = field(default_factory=dict)
    _lru: OrderedDict[int, str] = field(default_factory=OrderedDict)
    _next: int = 0

    def _drop(self, entry_id: int) -> None:
        key = self._lru.pop(entry_id)
        group = self._by_key[key]
        del group[entry_id]
        if not group:
            del self._by_key[key]

    def _invalidate(self, index_version: int) -> None:
        """A newer index makes every older answer stale (its evidence may have changed)."""
        if index_version > self.index_version:
            self.index_version = index_version
            self.stats.invalidations += len(self._lru)
            self._by_key.clear()
            self._lru.clear()

    def lookup(
        self, key: str, text: str, vector: np.ndarray, index_version: int
    ) -> tuple[dict[str, Any], float, str, str] | None:
        """The cached answer, its similarity, the question it was made for and who asked it;
        or None."""
        self._invalidate(index_version)
        now = self.clock()
        group = self._by_key.get(key, {})
        for i in [i for i, e in group.items() if e.expires <= now]:
            self._drop(i)
        group = self._by_key.get(key, {})
        if not group or index_version < self.index_version:
            self.stats.misses += 1
            return None
        norm, sig = normalise(text), signature(text)
        ids = [i for i, e in group.items() if e.signature == sig or e.text == norm]
        if not ids:
            self.stats.misses += 1
            return None
        sims = np.stack([group[i].vector for i in ids]) @ np.asarray(vector, dtype=np.float32)
        for n, i in enumerate(ids):
            if group[i].text == norm:
                sims[n] = 1.0
        best = int(np.argmax(sims))
        if sims[best] < self.min_similarity:
            self.stats.misses += 1
            return None
        entry = group[ids[best]]
        self._lru.move_to_end(ids[best])
        self.stats.hits += 1
        self.stats.saved_usd += entry.saved_usd
        return entry.answer, float(sims[best]), entry.question, entry.owner

    def store(
        self,
        key: str,
        text: str,
        vector: np.ndarray,
        answer: dict[str, Any],
        index_version: int,
        saved_usd: float,
        owner: str = "",
    ) -> bool:
        """False when the answer is already stale (the index moved on while it was made)."""
        self._invalidate(index_version)
        if index_version < self.index_version:
            return False
        entry_id, self._next = self._next, self._next + 1
        self._by_key.setdefault(key, {})[entry_id] = Entry(
            question=text,
            text=normalise(text),
            signature=signature(text),
            vector=np.asarray(vector, dtype=np.float32),
            answer=answer,
            index_version=index_version,
            expires=self.clock() + self.ttl_s,
            saved_usd=saved_usd,
            owner=owner,
        )
        self._lru[entry_id] = key
        self.stats.stores += 1
        while len(self._lru) > self.max_entries:
            self._drop(next(iter(self._lru)))
            self.stats.evictions += 1
        return True

    def reconfigure(self, max_entries: int, ttl_s: float, min_similarity: float) -> None:
        """New bounds for what comes next; entries over a smaller bound go, oldest first."""
        self.max_entries, self.ttl_s, self.min_similarity = max_entries, ttl_s, min_similarity
        while len(self._lru) > self.max_entries:
            self._drop(next(iter(self._lru)))
            self.stats.evictions += 1

    def __len__(self) -> int:
        return len(self._lru)
