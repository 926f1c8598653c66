import re

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


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ({"tags": ["t"] * 33}, "33 tags; the limit is 32"),
        ({"tags": ["t" * 65]}, "longer than 64 characters"),
        ({"tags": [1]}, "list of strings"),
        ({"x": "y" * 20_000}, "the limit is 16384"),
        (
            {"a": [[[[[[[[[[{}]]]]]]]]]]},
            "deeper than 8 levels",
        ),  # what GET answered with a 500 at 300 levels
    ],
)
def test_metadata_is_bounded_and_the_bound_named(metadata, says):
    with pytest.raises(ValidationError, match=re.escape(says)):
        DocumentIn(text="t", metadata=metadata)
    deep: dict = {}
    for _ in range(100_000):  # the check itself is not what a deep value breaks
        deep = {"d": deep}
    with pytest.raises(ValidationError, match="deeper than"):
        DocumentIn(text="t", metadata=deep)
