"""/v1/answer and the documents API over HTTP, against the shared cluster."""

import re
import uuid

import pytest
from ray import serve

from hybrid_serve.agents.citations import markers
from tests.conftest import APP
from tests.support.documents import long_documents

pytestmark = pytest.mark.e2e


def test_answer_contract(client):
    r = client.post(
        "/v1/answer", json={"query": "How do I add documents?", "top_k": 4, "mode": "slm"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {
        "answer",
        "citations",
        "route",
        "confidence",
        "escalation",
        "verification",
        "subtasks",
        "usage",
        "degraded",
        "trace_id",
    }
    assert isinstance(body["answer"], str) and body["answer"].strip()
    assert body["route"] == "slm"
    assert 0.0 <= body["confidence"] <= 1.0
    assert body["escalation"] == {"escalated": False, "reasons": []}
    assert body["verification"] is None and body["subtasks"] == []
    usage = body["usage"]
    assert usage["slm_prompt_tokens"] > 50 and usage["slm_completion_tokens"] > 0
    assert usage["claude_input_tokens"] == usage["claude_output_tokens"] == 0
    assert usage["cost_usd"] == 0.0 and usage["all_claude_cost_usd_estimate"] > 0
    assert body["degraded"] == []
    assert re.fullmatch(r"[0-9a-f]{32}", body["trace_id"])
    numbers = [c["number"] for c in body["citations"]]
    assert numbers == list(range(1, len(numbers) + 1))
    assert set(markers(body["answer"])) == set(numbers)  # no dangling numbers, no unused entries
    for c in body["citations"]:
        assert set(c) == {"number", "doc_id", "collection", "title", "snippet", "score"}
        assert c["collection"] == "default"
        assert c["doc_id"].startswith("sample:") and c["snippet"]


def test_the_largest_top_k_is_answered_from_the_passages_that_fit(client):
    """top_k 50 over long passages is more than the SLM's context holds (it was a 500): the
    best passages that fit are shown, the answer cites only those, and the response says so.
    The documents are this test's own, removed at the end."""
    docs = long_documents("fit", "zqxwv", 60)
    for i in range(0, len(docs), 10):  # under the test cluster's body limit
        r = client.post("/v1/documents", json={"documents": docs[i : i + 10]})
        assert r.status_code == 201, r.text
    try:
        body = {"query": "Which zqxwv entry lists an owl?", "top_k": 50, "mode": "slm"}
        r = client.post("/v1/answer", json={**body, "use_cache": False}, timeout=300)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert "prompt_trimmed" in answer["degraded"]
        assert 1000 < answer["usage"]["slm_prompt_tokens"] <= 4096 - 48
        numbers = [c["number"] for c in answer["citations"]]
        assert numbers == list(range(1, len(numbers) + 1))  # only passages the model saw
    finally:
        for d in docs:
            client.delete(f"/v1/documents/{d['id']}")


def test_traceparent_continues_the_callers_trace(client):
    trace = uuid.uuid4().hex
    r = client.post(
        "/v1/answer",
        json={"query": "What is hybrid-serve?"},
        headers={"traceparent": f"00-{trace}-{'1' * 16}-01"},
    )
    assert r.status_code == 200 and r.json()["trace_id"] == trace


@pytest.mark.parametrize(
    "payload,status,needle",
    [
        ({"query": ""}, 422, "query"),
        ({"query": "   "}, 422, "empty"),
        ({"query": 42}, 422, "string"),
        ({"query": ["a"]}, 422, "string"),
        ({"query": "q", "top_k": 0}, 422, "top_k"),
        ({"query": "q", "top_k": 51}, 422, "top_k"),
        ({"query": "q", "top_k": "five"}, 422, "top_k"),
        ({"query": "q", "colour": "blue"}, 422, "unknown field"),
        ({}, 422, "query: field required"),
        ([1, 2], 400, "JSON object"),
        ({"query": "x" * 501}, 422, "limit is 500"),
    ],
)
def test_bad_input_is_a_clear_4xx(client, payload, status, needle):
    r = client.post("/v1/answer", json=payload)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_not_json_and_oversized(client):
    r = client.post(
        "/v1/answer", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/answer", content=b"query=hi")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    big = b'{"query": "' + b"a" * (70 * 1024) + b'"}'
    r = client.post("/v1/answer", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit must hold for streamed bodies too
        for _ in range(70):
            yield b"a" * 1024

    r = client.post("/v1/answer", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_route_and_method(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/answer")
    assert r.status_code == 405 and "error" in r.json()


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    comps = r.json()["components"]
    assert comps["retriever"]["ready"] and comps["retriever"]["documents"] >= 8
    assert comps["slm"]["ready"]
    assert comps["claude"]["available"] is True and comps["claude"]["circuit"] == "closed"


def test_documents_add_get_delete(client):
    word = "zorblax" + uuid.uuid4().hex[:6]
    doc = {
        "title": "Zorblax",
        "text": f"The {word} is a rare purple bird of the Andes.",
        "metadata": {"team": "birds"},
    }
    r = client.post("/v1/documents", json=doc)
    assert r.status_code == 201, r.text
    doc_id = r.json()["ids"][0]
    got = client.get(f"/v1/documents/{doc_id}").json()
    assert got["text"] == doc["text"] and got["metadata"] == {"team": "birds"}
    retriever = serve.get_deployment_handle("Retriever", app_name=APP)
    assert retriever.search.remote(f"{word} bird", 1).result()[0].doc_id == doc_id

    r = client.delete(f"/v1/documents/{doc_id}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert client.get(f"/v1/documents/{doc_id}").status_code == 404
    assert client.delete(f"/v1/documents/{doc_id}").status_code == 404
    hits = retriever.search.remote(f"{word} bird", 10).result()
    assert all(h.doc_id != doc_id for h in hits)


def test_documents_batch_and_bad_documents(client):
    r = client.post(
        "/v1/documents",
        json={
            "documents": [
                {"id": "b-1", "title": "One", "text": "First batch document."},
                {"id": "b-2", "title": "Two", "text": "Second batch document."},
            ]
        },
    )
    assert r.status_code == 201 and r.json()["ids"] == ["b-1", "b-2"]
    assert client.post("/v1/documents", json={"title": "no text"}).status_code == 422
    assert client.post("/v1/documents", json={"documents": []}).status_code == 422
    assert client.post("/v1/documents", json={"text": "   "}).status_code == 422


def test_search_returns_the_fused_ranking(client):
    r = client.post(
        "/v1/search", json={"query": "How are documents split into chunks?", "top_k": 3}
    )
    assert r.status_code == 200
    body = r.json()
    assert len(body["passages"]) == 3 and body["index_version"] >= 1
    scores = [p["score"] for p in body["passages"]]
    assert scores == sorted(scores, reverse=True)
    assert all(p["doc_id"] and p["chunk_id"] and p["text"] for p in body["passages"])
    bad = client.post("/v1/search", json={"query": " ", "top_k": 0})
    assert bad.status_code == 422 and bad.json()["error"]["code"]
