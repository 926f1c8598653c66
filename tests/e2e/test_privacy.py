"""Data stays where it belongs, over HTTP: an application on the shared cluster with API keys
scoped to collections, a public and a `Confidential` document, and Claude's calls recorded by the
local Messages-API server. Every path by which a request reaches the LLM tier — a rewrite's second
retrieval, sub-tasks, a follow-up's earlier turns, a history that matches a pattern, a mixed-case
tag — leaves nothing of the confidential document in the recording; keys with different
collections cannot see, cache-hit or delete each other's documents; the health routes give a
stranger nothing but ready or not."""

import os
import time

import httpx
import openai
import pytest
from ray import serve

from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.app import build
from hybrid_serve.engines.llama_cpp import GOMP_SPINCOUNT, OPENMP_SETTINGS
from tests.conftest import wait_ready

pytestmark = pytest.mark.e2e

PREFIX = "/private"
ENG, ENG2, FIN, OPS = "eng-key-0001", "eng2-key-0002", "fin-key-0003", "ops-key-0004"
MARKER = "ZEBRA-7731"  # only in the confidential document
DOCS = {
    "ports": ("Ports", "The HTTP API of the cluster listens on port 8000 by default."),
    "falcon": ("Falcon", f"The launch code of the rocket is {MARKER}. Keep it safe."),
    "chunks": ("Chunks", "Documents are split into overlapping chunks of about 180 words."),
}
PORT_Q = "Which port does the HTTP API listen on?"


@pytest.fixture(scope="module")
def private(app, tmp_path_factory):
    cfg = HybridServeConfig.load(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("private")),
            "http.port": app.cfg.http.port,
            "http.api_keys": [
                {"key": ENG, "name": "eng", "collections": ["eng"]},
                {"key": ENG2, "name": "eng2", "collections": ["eng"]},
                {"key": FIN, "name": "fin", "collections": ["fin"]},
                {"key": OPS, "name": "ops", "admin": True},
            ],
            "retriever.index_sample_corpus": False,
            "escalation.threshold": 1.0,  # every answer in mode auto escalates
            "policies.sensitive_patterns": [r"project\s+falcon"],
            "slm.max_tokens": 16,
        }
    )
    serve.run(build(cfg), name="private", route_prefix=PREFIX)
    url = app.url + PREFIX
    wait_ready(url)
    for doc_id, (title, text) in DOCS.items():
        tags = ["Confidential"] if doc_id == "falcon" else []
        body = {"id": doc_id, "title": title, "text": text, "metadata": {"tags": tags}}
        assert post(url, "/v1/documents", ENG, body).status_code == 201
    budget = {"id": "budget", "text": "The travel budget of the finance team is 91,000 euros."}
    assert post(url, "/v1/documents", FIN, budget).status_code == 201
    yield url
    serve.delete("private")


def post(url: str, path: str, key: str | None, body: dict) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=180)


def answer(url: str, key: str = ENG, **body) -> dict:
    body.setdefault("top_k", 1)
    r = post(url, "/v1/answer", key, body)
    assert r.status_code == 200, r.text
    return r.json()


def leaked(claude) -> list[str]:
    """What of the confidential document reached the LLM tier."""
    return [c.text for c in claude.calls() if MARKER in c.text or "launch code" in c.text]


def test_a_rewrite_whose_search_finds_a_confidential_document(private, app):
    app.claude.reset()
    rewrite = {
        "rewritten_query": "What is the launch code of the rocket?",
        "search_queries": ["rocket launch code"],
        "steps": [],
    }
    app.claude.queue_tool_input("rewrite_query", rewrite)
    r = answer(private, query=PORT_Q, verify="always")
    assert app.claude.calls("rewrite_query")  # the question was public until then
    assert leaked(app.claude) == []
    assert r["sensitive"] and "sensitive_local_only" in r["degraded"]
    assert r["route"] != "claude" and r["verification"] is None
    assert answer(private, query=PORT_Q, verify="always")["cache"] != "hit"  # never cached


def test_subtasks_that_find_a_confidential_document(private, app):
    app.claude.reset()
    plan = {
        "subtasks": [
            {"id": "s1", "question": PORT_Q, "search_queries": ["HTTP port"], "depends_on": []},
            {
                "id": "s2",
                "question": "What is the launch code?",
                "search_queries": ["rocket launch code"],
                "depends_on": [],
            },
        ]
    }
    app.claude.queue_tool_input("plan_subtasks", plan)
    r = answer(private, query=f"{PORT_Q} And the other thing?", mode="decompose", verify="auto")
    assert r["route"] == "decomposed" and r["sensitive"]
    assert [c.body["tool_choice"]["name"] for c in app.claude.calls()] == ["plan_subtasks"]
    assert leaked(app.claude) == []


def test_a_follow_up_to_an_answer_written_from_a_confidential_document(private, app):
    app.claude.reset()
    oa = openai.OpenAI(base_url=f"{private}/v1", api_key=ENG, max_retries=0, timeout=180)
    reply = oa.chat.completions.create(
        model="hybrid",
        messages=[
            {"role": "user", "content": "What does the Falcon file say?"},
            {"role": "assistant", "content": f"The launch code of the rocket is {MARKER} [1]."},
            {"role": "user", "content": "And which port does the HTTP API use?"},
        ],
        extra_body={"hybrid": {"top_k": 1, "verify": "always"}},
    )
    assert reply.model_extra["hybrid"]["sensitive"]
    assert app.claude.calls() == []  # not the condense call, not an escalation, not a grade


def test_a_history_matching_a_sensitive_pattern(private, app):
    app.claude.reset()
    oa = openai.OpenAI(base_url=f"{private}/v1", api_key=ENG, max_retries=0, timeout=180)
    reply = oa.chat.completions.create(
        model="hybrid",
        messages=[
            {"role": "user", "content": "Who runs Project Falcon?"},
            {"role": "assistant", "content": "I don't know."},
            {"role": "user", "content": "Which port does the HTTP API use?"},
        ],
        extra_body={"hybrid": {"top_k": 1}},
    )
    assert reply.model_extra["hybrid"]["sensitive"]
    assert [c for c in app.claude.calls() if "falcon" in c.text.lower()] == []
    assert app.claude.calls() == []


def test_a_mixed_case_tag_keeps_the_question_local(private, app):
    app.claude.reset()
    r = answer(private, query="What is the launch code of the rocket?", mode="claude")
    assert r["sensitive"] and r["route"] == "slm" and app.claude.calls() == []


def test_keys_see_only_their_collections(private):
    hits = post(private, "/v1/search", FIN, {"query": "rocket launch code", "top_k": 10}).json()
    assert {p["doc_id"] for p in hits["passages"]} == {"budget"}
    assert {p["collection"] for p in hits["passages"]} == {"fin"}
    mine = post(private, "/v1/search", ENG, {"query": "travel budget", "top_k": 10}).json()
    assert "budget" not in {p["doc_id"] for p in mine["passages"]}
    r = answer(private, FIN, query="What is the launch code of the rocket?", mode="slm", top_k=5)
    assert {c["doc_id"] for c in r["citations"]} <= {"budget"} and not r["sensitive"]
    for method in ("GET", "DELETE"):  # another collection's document is as absent as none
        for where in ("", "?collection=eng"):
            resp = httpx.request(
                method, f"{private}/v1/documents/falcon{where}", headers={"x-api-key": FIN}
            )
            assert resp.status_code == 404, (method, where, resp.text)
    elsewhere = {"id": "ports", "text": "x", "collection": "eng"}
    forbidden = post(private, "/v1/documents", FIN, elsewhere)
    assert forbidden.status_code == 403 and "fin" in forbidden.json()["error"]["message"]
    got = httpx.get(f"{private}/v1/documents/falcon", headers={"x-api-key": ENG}).json()
    assert got["collection"] == "eng" and got["metadata"]["tags"] == ["Confidential"]
    admin = httpx.get(f"{private}/v1/documents/falcon", headers={"x-api-key": OPS})
    assert admin.status_code == 200
    # The same id in another collection is another document.
    same = post(private, "/v1/documents", FIN, {"id": "ports", "text": "Finance port is 9."})
    assert same.status_code == 201
    ports = httpx.get(f"{private}/v1/documents/ports", headers={"x-api-key": ENG}).json()
    assert ports["collection"] == "eng" and "8000" in ports["text"]


def test_the_answer_cache_is_partitioned_by_collections(private):
    question = "How are documents split?"
    first = answer(private, ENG, query=question, mode="slm")
    assert first["cache"] == "miss"
    time.sleep(0.5)  # the store is not awaited by the response
    again = answer(private, ENG, query=question, mode="slm")
    assert again["cache"] == "hit" and again["cached_question"] == question
    shared = answer(private, ENG2, query=question, mode="slm")  # same collections, other key
    assert shared["cache"] == "hit" and shared["cached_question"] is None  # not its wording
    assert answer(private, FIN, query=question, mode="slm")["cache"] == "miss"


def test_usage_shows_a_key_its_own_line(private):
    time.sleep(0.5)
    mine = httpx.get(f"{private}/v1/usage", headers={"x-api-key": FIN}).json()
    assert set(mine) == {"keys"} and set(mine["keys"]) == {"fin"}
    ops = httpx.get(f"{private}/v1/usage", headers={"x-api-key": OPS}).json()
    assert "totals" in ops and {"eng", "fin"} <= set(ops["keys"])


def test_health_routes_give_a_stranger_nothing_but_readiness(private):
    stranger = httpx.get(f"{private}/readyz").json()
    assert stranger["ready"] is True
    assert all(c == {"ready": True} for c in stranger["components"].values())
    for key in (None, "wrong-key", FIN):
        headers = {"x-api-key": key} if key else {}
        text = httpx.get(f"{private}/readyz", headers=headers).text
        assert "budget_remaining_usd" not in text and "pid" not in text and "node" not in text
    admin = httpx.get(f"{private}/readyz", headers={"x-api-key": OPS}).json()
    assert "budget_remaining_usd" in admin["components"]["claude"]
    assert "placement" in admin["components"]["slm"]
    # The SLM replica runs llama.cpp with OpenMP's spinning cut short (its runtime_env), or as
    # the operator set it.
    own = {k: os.environ[k] for k in OPENMP_SETTINGS if k in os.environ}
    assert admin["components"]["slm"]["openmp"] == (own or {"GOMP_SPINCOUNT": GOMP_SPINCOUNT})
