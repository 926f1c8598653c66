import math

import pytest

from hybrid_serve.agents.citations import finalize
from hybrid_serve.agents.confidence import (
    is_refusal,
    query_shape,
    retrieval_confidence,
    retrieval_margin,
    score_answer,
    token_confidence,
)
from hybrid_serve.schemas import Passage


def P(text="Paris is the capital of France.", dense=0.7, doc="a"):
    return Passage(
        chunk_id=f"{doc}#0", doc_id=doc, title=doc.upper(), text=text, score=0.03, dense_score=dense
    )


GOOD_LP = [math.log(0.95)] * 8
Q = "What is the capital of France?"


def test_token_confidence_is_geometric_mean():
    assert token_confidence([math.log(0.5), math.log(0.5)]) == pytest.approx(0.5)
    assert token_confidence([]) == 0.0


def test_retrieval_signals():
    assert retrieval_confidence([P(dense=0.9)]) == 1.0
    assert retrieval_confidence([P(dense=0.15)]) == pytest.approx(0.25)
    assert retrieval_confidence([]) == 0.0
    assert retrieval_margin([P(dense=0.8, doc="a"), P(dense=0.2, doc="b")]) == 1.0
    assert retrieval_margin([P(dense=0.5, doc="a"), P(dense=0.5, doc="b")]) == 0.0


def test_refusal_detection():
    assert is_refusal("I don't know.")
    assert is_refusal("The passages do not mention it.")
    assert not is_refusal("Paris is the capital [1].")


def test_confident_supported_answer_scores_high_with_no_reasons():
    text, cites = finalize("Paris is the capital of France [1].", [P()])
    c = score_answer(Q, text, cites, [P()], GOOD_LP)
    assert c.score > 0.8 and c.reasons == []


def test_each_failure_sign_names_its_reason():
    text, cites = finalize("Paris is the capital of France [1].", [P()])
    low_tokens = score_answer(Q, text, cites, [P()], [math.log(0.2)] * 8)
    assert "low_token_confidence" in low_tokens.reasons
    weak = score_answer(Q, text, cites, [P(dense=0.1)], GOOD_LP)
    assert "weak_retrieval" in weak.reasons
    bad_text, bad = finalize("Lyon hosts the annual parliament [1].", [P()])
    unsupported = score_answer(Q, bad_text, bad, [P()], GOOD_LP)
    assert "unsupported_claims" in unsupported.reasons
    refusal = score_answer(Q, "I don't know.", [], [P()], GOOD_LP)
    assert {"refusal", "no_citation"} <= set(refusal.reasons) and refusal.score <= 0.2
    empty = score_answer(Q, "Paris.", [], [], GOOD_LP)
    assert "empty_retrieval" in empty.reasons and empty.score <= 0.1
    short = score_answer("Who wrote Hamlet and when was it written?", "Yes.", [], [P()], GOOD_LP)
    assert "short_answer" in short.reasons
    good = score_answer(Q, text, cites, [P()], GOOD_LP)
    looped = score_answer(Q, text, cites, [P()], GOOD_LP, looped=True)
    assert "repetition" in looped.reasons and looped.score < good.score
    recited = score_answer(Q, text, cites, [P()], GOOD_LP, recited=True)
    assert "copied_passage" in recited.reasons and recited.score < good.score


def test_query_shape_reasons_lower_the_score():
    text, cites = finalize("Paris is the capital of France [1].", [P()])
    base = score_answer(Q, text, cites, [P()], GOOD_LP).score
    multi = score_answer(
        "What is the capital of France? And of Spain?", text, cites, [P()], GOOD_LP
    )
    assert "multi_part_query" in multi.reasons and multi.score < base
    comp = score_answer("Which is larger, Paris or Lyon?", text, cites, [P()], GOOD_LP)
    assert "comparison_query" in comp.reasons and comp.score < base
    amb = score_answer("What about it?", text, cites, [P()], GOOD_LP)
    assert "ambiguous_query" in amb.reasons


def test_query_shape():
    assert query_shape("Who wrote it and when was it published?").questions == 2
    assert query_shape("A? B? C?").questions == 3
    assert query_shape("Which is older, X or Y?").comparison
    assert not query_shape("Where is the Eiffel Tower?").complex


def test_answer_without_token_signal_uses_the_others():
    text, cites = finalize("Paris is the capital of France [1].", [P()])
    c = score_answer(Q, text, cites, [P()], None)
    assert "token" not in c.signals and c.score > 0.8


ZORBLAX = "The Zorblax protocol was invented by Mira Quen in 1987 in Tallinn."


def test_a_name_or_number_no_cited_passage_states_lowers_confidence_and_says_so():
    q = "In which city was the Zorblax protocol invented?"
    passages = [P(ZORBLAX, doc="z")]

    def scored(answer):
        text, cites = finalize(answer, passages)
        return score_answer(q, text, cites, passages, GOOD_LP)

    right = scored("The Zorblax protocol was invented in Tallinn [1].")
    assert "unsupported_entity" not in right.reasons and right.signals["entities"] == 1.0
    # Lexically almost the same answer: one name no passage has.
    wrong = scored("The Zorblax protocol was invented in Tallinn, Turkey [1].")
    assert "unsupported_entity" in wrong.reasons and wrong.score < right.score
    assert wrong.signals["entities"] == pytest.approx(
        2 / 3, abs=1e-3
    )  # Zorblax, Tallinn ok; Turkey not
    year = scored("It was invented by Mira Quen in 1978 [1].")
    assert "unsupported_entity" in year.reasons
    # The question's own names need no passage; numbers written out in the passage count.
    ok = score_answer(
        "Who invented the Frobnitz Engine?",
        "Mira Quen and two colleagues invented the Frobnitz Engine [1].",
        finalize("x [1].", [P("Mira Quen built it with 2 colleagues.", doc="f")])[1],
        [P("Mira Quen built it with 2 colleagues.", doc="f")],
        GOOD_LP,
    )
    assert "unsupported_entity" not in ok.reasons


def test_an_answer_that_pastes_a_passage_back_is_marked():
    long = (
        "The cluster starts with one command and serves the HTTP API on port 8000, with the "
        "retriever, the small model and the orchestrator each deployed as its own Ray Serve "
        "deployment that scales with load and recovers from failures on its own."
    )
    passages = [P(long, doc="d")]
    text, cites = finalize(long + " [1]", passages)
    copied = score_answer("How does the cluster start?", text, cites, passages, GOOD_LP)
    assert "copied_passage" in copied.reasons
    short, cites = finalize("With one command, on port 8000 [1].", passages)
    answer = score_answer("How does the cluster start?", short, cites, passages, GOOD_LP)
    assert "copied_passage" not in answer.reasons
