import math

from agents.citations import finalize
from agents.confidence import is_refusal, score_answer, token_confidence
from agents.schemas import Passage

P = [
    Passage(
        chunk_id="a#0",
        doc_id="a",
        title="A",
        text="Paris is the capital of France.",
        score=0.03,
        dense_score=0.7,
    )
]


def test_token_confidence_is_geometric_mean():
    assert token_confidence([math.log(0.5), math.log(0.5)]) == 0.5
    assert token_confidence([]) == 0.0


def test_refusal_detection():
    assert is_refusal("I don't know.")
    assert is_refusal("The passages do not mention it.")
    assert not is_refusal("Paris is the capital [1].")


def test_confident_supported_answer_scores_high():
    text, cites = finalize("Paris is the capital of France [1].", P)
    c = score_answer(text, cites, P, [math.log(0.95)] * 8)
    assert c.score > 0.8 and not c.flags


def test_refusal_and_empty_retrieval_cap_the_score():
    text, cites = finalize("I don't know.", P)
    assert score_answer(text, cites, P, [0.0] * 3).score <= 0.2
    assert score_answer("Paris.", [], [], [0.0]).score <= 0.1


def test_unsupported_answer_scores_lower_than_supported():
    good_text, good = finalize("Paris is the capital of France [1].", P)
    bad_text, bad = finalize("Lyon hosts the annual parliament [1].", P)
    lp = [math.log(0.9)] * 6
    assert score_answer(bad_text, bad, P, lp).score < score_answer(good_text, good, P, lp).score
