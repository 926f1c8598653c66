"""The answer cache's rules, on vectors made to the similarity each case needs."""

import numpy as np
import pytest

from hybrid_serve.agents.semantic_cache import SemanticCache, signature


def unit(angle_cos: float) -> np.ndarray:
    """A unit vector whose cosine with [1, 0] is `angle_cos`."""
    return np.array([angle_cos, np.sqrt(1 - angle_cos**2)], dtype=np.float32)


BASE = unit(1.0)


@pytest.fixture
def clock():
    return [0.0]


@pytest.fixture
def cache(clock):
    return SemanticCache(max_entries=3, ttl_s=60, min_similarity=0.95, clock=lambda: clock[0])


def test_same_and_near_identical_questions_hit(cache):
    cache.store("k", "How do I add documents?", BASE, {"answer": "a"}, 1, 0.01)
    assert cache.lookup("k", "how do i  add documents", unit(0.2), 1)[1] == 1.0  # same text
    answer, sim, made_for, _ = cache.lookup("k", "How can I add documents?", unit(0.96), 1)
    assert answer == {"answer": "a"} and sim == pytest.approx(0.96)
    assert made_for == "How do I add documents?"
    assert cache.lookup("k", "How can I add documents?", unit(0.90), 1) is None
    assert cache.stats.hits == 2 and cache.stats.misses == 1
    assert cache.stats.saved_usd == pytest.approx(0.02)


def test_other_options_question_words_numbers_and_negation_never_hit(cache):
    cache.store("k", "Who invented the Zorblax protocol?", BASE, {"answer": "a"}, 1, 0.0)
    assert cache.lookup("other-key", "Who invented the Zorblax protocol?", BASE, 1) is None
    assert cache.lookup("k", "Where was the Zorblax protocol invented?", unit(0.99), 1) is None
    cache.store("k", "What are the top 5 models?", BASE, {"answer": "b"}, 1, 0.0)
    assert cache.lookup("k", "What are the top 10 models?", unit(0.99), 1) is None
    cache.store("k", "Why does it start?", BASE, {"answer": "c"}, 1, 0.0)
    assert cache.lookup("k", "Why doesn't it start?", unit(0.99), 1) is None
    assert signature("Why doesn't it start?")[2] and not signature("Why does it start?")[2]


def test_ttl_and_index_changes_expire_entries(cache, clock):
    cache.store("k", "q one", BASE, {"answer": "a"}, 1, 0.0)
    clock[0] = 61
    assert cache.lookup("k", "q one", BASE, 1) is None and len(cache) == 0
    cache.store("k", "q one", BASE, {"answer": "a"}, 1, 0.0)
    assert cache.lookup("k", "q one", BASE, 2) is None  # the index moved on
    assert len(cache) == 0 and cache.stats.invalidations == 1
    # an answer made on the old index is not stored once a newer one was seen
    assert cache.store("k", "q one", BASE, {"answer": "old"}, 1, 0.0) is False


def test_bounded_least_recently_used_first(cache):
    for i in range(3):
        cache.store("k", f"q {i}", unit(0.5 + 0.1 * i), {"answer": i}, 1, 0.0)
    assert cache.lookup("k", "q 0", BASE, 1) is not None  # q 0 is now the most recent
    cache.store("k", "q 3", BASE, {"answer": 3}, 1, 0.0)
    assert len(cache) == 3 and cache.stats.evictions == 1
    assert cache.lookup("k", "q 1", unit(0.6), 1) is None  # the least recently used went
    assert cache.lookup("k", "q 0", unit(0.5), 1)[0] == {"answer": 0}
