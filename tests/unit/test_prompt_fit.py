"""Fitting a prompt to the engine's context: the best passages first, the last one cut at a
sentence end, the oldest turns dropped first, room kept for max_tokens, a 400 when not even the
question fits."""

from __future__ import annotations

import pytest

from hybrid_serve.agents.prompts import answer_prompt
from hybrid_serve.engines.prompt_fit import PromptTooLong, fit_prompt
from hybrid_serve.schemas import GenerationRequest, Passage


def words(messages: list[dict[str, str]]) -> int:
    """A tokenizer stand-in: a token a word."""
    return sum(len(m["content"].split()) + 4 for m in messages)


def passages(n: int, sentences: int = 4) -> list[Passage]:
    body = " ".join(
        f"Sentence {j} of passage {{i}} has eight words here." for j in range(sentences)
    )
    return [
        Passage(chunk_id=f"d{i}#0", doc_id=f"d{i}", title=f"T{i}", text=body.format(i=i))
        for i in range(n)
    ]


def request(n: int, history: int = 0, max_tokens: int = 50) -> GenerationRequest:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 20}
             for i in range(history)]  # fmt: skip
    prompt = answer_prompt("Which passage?", passages(n), turns)
    return GenerationRequest(
        messages=prompt.messages,
        evidence=prompt.evidence,
        evidence_at=prompt.evidence_at,
        max_tokens=max_tokens,
    )


def test_a_prompt_that_fits_is_sent_as_it_is():
    req = request(3)
    fitted = fit_prompt(req, words, 4096)
    assert fitted.messages == req.messages and not fitted.trimmed


def test_the_best_passages_stay_and_the_last_is_cut_at_a_sentence_end():
    req = request(50)
    assert words(req.messages) > 1000
    fitted = fit_prompt(req, words, 600)
    assert words(fitted.messages) <= 600 - 50
    text = fitted.messages[-1]["content"]
    assert fitted.trimmed and 1 <= fitted.evidence_used < 50
    assert all(f"[{i + 1}] (T{i})" in text for i in range(fitted.evidence_used))
    assert f"[{fitted.evidence_used + 1}]" not in text
    assert text.rstrip().endswith("like [1].")  # the question and instructions are whole
    last = text.split(f"[{fitted.evidence_used}] ")[1].split("\n>>>")[0]
    assert last.endswith(". …") or last.endswith("here.")  # at a sentence end


def test_the_oldest_turns_go_before_any_passage():
    req = request(5, history=4)
    room = words(req.messages) - 30 + 50  # a little too long
    fitted = fit_prompt(req, words, room)
    assert fitted.history_dropped >= 1 and fitted.evidence_used == 5
    assert fitted.messages[0]["role"] == "system"
    assert "turn 3" in str(fitted.messages) and "turn 0" not in str(fitted.messages)


def test_a_question_that_cannot_fit_is_a_client_error():
    with pytest.raises(PromptTooLong, match="holds"):
        fit_prompt(request(5), words, 60)
    with pytest.raises(PromptTooLong, match="max_tokens is 5000"):
        fit_prompt(request(1, max_tokens=5000), words, 4096)


def test_an_engine_without_a_count_sends_the_messages_as_they_are():
    req = request(50)
    assert fit_prompt(req, None, None).messages == req.messages
