"""The repetition stop: its rule (vLLM's), its bounds, and llama.cpp stopping a real loop."""

import pytest
from pydantic import ValidationError

from hybrid_serve.engines.chat_wire import StreamTally, chat_params
from hybrid_serve.engines.repetition import repeats
from hybrid_serve.schemas import (
    REPETITION_COUNT_MAX,
    REPETITION_PATTERN_MAX,
    GenerationRequest,
    RepetitionDetection,
)
from tests.support.repetition import random_cases

RULE = RepetitionDetection(min_pattern_size=2, max_pattern_size=6, min_count=3)


def by_slicing(tokens: list[int], p: RepetitionDetection) -> bool:
    """The rule read literally: the tail is some pattern written min_count times."""
    return any(
        len(tokens) >= n * p.min_count and tokens[-n * p.min_count :] == tokens[-n:] * p.min_count
        for n in range(p.min_pattern_size, p.max_pattern_size + 1)
    )


def test_a_pattern_written_min_count_times_back_to_back_stops():
    assert repeats([9, 1, 2, 1, 2, 1, 2], RULE)
    assert not repeats([9, 1, 2, 1, 2], RULE)  # twice is not three times
    assert not repeats([1, 2, 1, 2, 7, 1, 2], RULE)  # not back to back
    assert repeats([5, 5, 5, 5, 5, 5], RULE)  # (5, 5) three times
    assert not repeats([5, 5, 5], RULE)  # a one-token pattern is below min_pattern_size
    long = list(range(7)) * 3
    assert not repeats(long, RULE)  # a seven-token pattern is above max_pattern_size
    assert repeats(long, RULE.model_copy(update={"max_pattern_size": 7}))


def test_the_rule_matches_its_literal_reading_on_random_sequences():
    for tokens, p in random_cases(seed=7):
        assert repeats(tokens, p) == by_slicing(tokens, p), (tokens, p)


def test_bounds_are_enforced_and_named():
    for bad in (
        {"max_pattern_size": REPETITION_PATTERN_MAX + 1, "min_count": 2},
        {"max_pattern_size": 8, "min_count": REPETITION_COUNT_MAX + 1},
        {"max_pattern_size": 8, "min_count": 1},
        {"max_pattern_size": 4, "min_pattern_size": 5, "min_count": 2},
        {"max_pattern_size": 8, "min_count": 2, "window": 3},
    ):
        with pytest.raises(ValidationError):
            RepetitionDetection(**bad)


def test_vllm_servers_are_sent_it_and_its_finish_reason_is_read():
    req = GenerationRequest(messages=[{"role": "user", "content": "hi"}], repetition_detection=RULE)
    assert chat_params("m", req)["repetition_detection"] == {
        "max_pattern_size": 6,
        "min_pattern_size": 2,
        "min_count": 3,
    }
    assert "repetition_detection" not in chat_params("m", req, vllm_extensions=False)
    tally = StreamTally("m")
    tally.choice("a", [], None)
    tally.choice(None, [], "repetition")
    assert tally.result().finish_reason == "repetition"


def test_llama_cpp_stops_a_real_loop_where_the_rule_says():
    """The bundled model, asked to repeat a word, loops until max_tokens; with the rule it stops
    after three turns of the loop."""
    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.engines.llama_cpp import LlamaCppEngine

    engine = LlamaCppEngine(bundled_gguf(), n_threads=1)
    ask = {"messages": [{"role": "user", "content": "Write the word 'la' fifty times."}]}
    looping = engine.generate_blocking(GenerationRequest(**ask, max_tokens=64))
    assert looping.finish_reason == "length" and looping.completion_tokens == 64
    rule = RepetitionDetection(max_pattern_size=16, min_count=3)
    stopped = engine.generate_blocking(
        GenerationRequest(**ask, max_tokens=64, repetition_detection=rule)
    )
    assert stopped.finish_reason == "repetition"
    assert stopped.completion_tokens <= 3 * 16 < 64
    text = stopped.text
    assert any(text[-3 * k :] == text[-k:] * 3 for k in range(1, len(text) // 3 + 1))
