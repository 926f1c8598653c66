import pytest
from pydantic import ValidationError

from hybrid_serve.schemas import AnswerRequest, DocumentBatch, DocumentIn


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"query": ""},
        {"query": "   "},
        {"query": 3},
        {"query": "q", "top_k": 0},
        {"query": "q", "top_k": 51},
        {"query": "q", "top_k": "5"},
        {"query": "q", "extra": 1},
    ],
)
def test_bad_answer_requests(body):
    with pytest.raises(ValidationError):
        AnswerRequest.model_validate(body)


def test_good_answer_request_defaults():
    assert AnswerRequest.model_validate({"query": "q"}).top_k == 5


def test_documents():
    assert DocumentIn.model_validate({"text": "t"}).id is None
    with pytest.raises(ValidationError):
        DocumentIn.model_validate({"text": " "})
    with pytest.raises(ValidationError):
        DocumentBatch.model_validate({"documents": []})
