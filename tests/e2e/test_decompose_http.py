"""Decomposition over HTTP on HotpotQA bridge and comparison questions: plans from Claude (the
local Messages-API server) and from the local planner, sub-agents on the SLM replicas, the merged
cited answer, and the SSE stream of /v1/answer."""

import json
import re

import pytest

from hybrid_serve.agents.citations import markers
from tests.conftest import shared_file

pytestmark = pytest.mark.e2e

BRIDGE = "hotpot-dev-004"  # the director of "Big Stone Gap" -> the New York city she is based in
COMPARISON = "hotpot-dev-000"  # Scott Derrickson and Ed Wood: same nationality?


@pytest.fixture(scope="module")
def hotpot(client) -> dict[str, dict]:
    """The questions used here, with all ten paragraphs of each ingested as documents."""
    hotpot_file = shared_file("data/hotpotqa/hotpotqa-dev-distractor-0-59.json")
    rows = {q["id"]: q for q in json.loads(hotpot_file.read_text())}
    docs = {}
    for qid in (BRIDGE, COMPARISON):
        ctx = rows[qid]["context"]
        for title, sentences in zip(ctx["title"], ctx["sentences"]):
            docs[title] = {"id": f"hotpot/{title}", "title": title, "text": "".join(sentences)}
    r = client.post("/v1/documents", json={"documents": list(docs.values())})
    assert r.status_code == 201, r.text
    return rows


def sse(client, body: dict) -> list[tuple[str, dict]]:
    events = []
    with client.stream("POST", "/v1/answer", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
    return events


def check_citations(answer: dict) -> None:
    numbers = {c["number"] for c in answer["citations"]}
    assert set(markers(answer["answer"])) <= numbers  # no number without an entry
    assert sorted(numbers) == list(range(1, len(numbers) + 1))


def test_bridge_question_with_a_claude_plan_runs_the_second_hop_after_the_first(
    client, app, hotpot
):
    q = hotpot[BRIDGE]
    app.claude.reset()
    app.claude.queue_tool_input(
        "plan_subtasks",
        {
            "subtasks": [
                {
                    "id": "s1",
                    "question": "Who directed the romantic comedy Big Stone Gap?",
                    "search_queries": ["Big Stone Gap film director"],
                    "depends_on": [],
                },
                {
                    "id": "s2",
                    "question": "In what New York city is {s1} based?",
                    "search_queries": ["{s1} based New York city"],
                    "depends_on": ["s1"],
                },
            ]
        },
    )
    events = sse(client, {"query": q["question"], "mode": "decompose", "verify": "always"})
    names = [n for n, _ in events]
    assert names[0] == "plan" and names[-1] == "done" and "error" not in names
    assert events[0][1]["planner"] == "claude"
    done = events[-1][1]
    assert done["route"] == "decomposed" and len(done["subtasks"]) == 2
    s1, s2 = done["subtasks"]
    assert s1["status"] == "ok" and s2["status"] == "ok"
    # The second hop ran after the first and asked with its answer in place of {s1}.
    subtask_events = [d["id"] for n, d in events if n == "subtask"]
    assert subtask_events == ["s1", "s2"]
    assert "{s1}" not in s2["question"] and s2["question"].startswith("In what New York city is")
    assert len(s2["question"]) > len("In what New York city is  based?")
    assert "Trigiani" in s2["question"]  # the name hop 1 found, not hop 1's whole sentence
    check_citations(done)
    # Hop 1 cites the film's page; whether SmolLM2-135M cites hop 2 varies, so the two-document
    # check is made on the comparison below, where each side has its own page.
    assert "hotpot/Big Stone Gap (film)" in {c["doc_id"] for c in done["citations"]}
    assert done["verification"] is not None and "verification" in names
    assert names.index("verification") > max(i for i, n in enumerate(names) if n == "answer")
    streamed = "".join(d["delta"] for n, d in events if n == "answer")
    assert streamed == done["answer"]
    planned = app.claude.calls("plan_subtasks")
    assert len(planned) == 1 and "Big Stone Gap" in planned[0].text


def test_comparison_without_claude_is_planned_locally(client, app, hotpot):
    q = hotpot[COMPARISON]
    app.claude.reset()
    r = client.post(
        "/v1/answer", json={"query": q["question"], "mode": "decompose", "sensitive": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert app.claude.calls() == []
    assert body["route"] == "decomposed" and "local_planner" in body["escalation"]["reasons"]
    assert "sensitive_local_only" in body["degraded"]
    questions = [s["question"] for s in body["subtasks"]]
    assert len(questions) == 2
    assert "Scott Derrickson" in questions[0] and "Ed Wood" in questions[1]
    check_citations(body)
    assert len({c["doc_id"] for c in body["citations"]}) >= 2
    for s in body["subtasks"]:
        assert set(s) == {"id", "question", "answer", "citations", "latency_ms", "status"}


def test_simple_question_streams_answer_then_done(client):
    events = sse(client, {"query": "How are documents split into chunks?", "mode": "slm"})
    names = [n for n, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"answer"}
    assert "".join(d["delta"] for _, d in events[:-1]) == events[-1][1]["answer"]


def test_stream_flag_is_validated(client):
    r = client.post("/v1/answer", json={"query": "x?", "stream": "yes"})
    assert r.status_code == 422 and r.json()["error"]["code"]
    assert re.search("stream", r.text)
