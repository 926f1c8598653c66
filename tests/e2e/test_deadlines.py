"""Every request answers within its deadline: against a Messages-API server that hangs, answers
late, or trickles its reply, requests come back by their deadline (X-Request-Timeout, `timeout_s`)
with the SLM's answer marked degraded, nothing reaches the server after the responses went out,
the budget ledger keeps no reservation, and a deadline too short for anything is a 504.
"""

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from hybrid_serve.benchmarks.fixed_latency_server import FixedLatencyServer
from hybrid_serve.config import HybridServeConfig
from tests.conftest import App, wait_ready
from tests.support.messages_api import Fault

pytestmark = pytest.mark.e2e

# What a response may take beyond its deadline: the HTTP hop and this 2-core machine's jitter.
MARGIN_S = 2.0
PREFIX = "/dl"


@pytest.fixture(scope="module")
def client(app: App, tmp_path_factory) -> Iterator[httpx.Client]:
    """A second application on the shared cluster whose SLM answers in a fixed 0.2 s (the
    `openai` engine against a local server), so that six concurrent requests measure deadlines,
    not two cores' generation speed; Claude with its default timeouts and retries, which add up
    to minutes against a hung upstream."""
    from ray import serve

    from hybrid_serve.deployments.app import build

    llm = FixedLatencyServer(latency_s=0.2).start()
    cfg = HybridServeConfig.load(
        overrides={
            "app_name": "deadlines",
            "data_dir": str(tmp_path_factory.mktemp("deadlines")),
            "http.port": app.cfg.http.port,
            "slm.engine": "openai",
            "slm.openai.base_url": llm.url,
            "slm.model_name": "slm",
            "slm.num_cpus": 0.1,
            "slm.contexts_per_replica": 8,
            "slm.max_ongoing_requests": 16,
            "retriever.num_cpus": 0.25,
        }
    )
    serve.run(build(cfg), name="deadlines", route_prefix=PREFIX)
    wait_ready(app.url + PREFIX)
    with httpx.Client(base_url=app.url + PREFIX, timeout=120) as c:
        yield c
    serve.delete("deadlines")
    llm.stop()


@pytest.fixture()
def upstream(app):
    """The shared Messages-API server, made to misbehave for one test."""
    yield app.claude
    app.claude.always = None
    app.claude.faults.clear()


def wait_reservations_released(client: httpx.Client, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        reserved = client.get("/readyz").json()["components"]["claude"]["reserved_usd"]
        if reserved == 0 or time.monotonic() > deadline:
            return reserved
        time.sleep(0.5)


def test_concurrent_requests_against_a_hung_upstream_answer_by_their_deadline(client, upstream):
    upstream.always = Fault(delay_s=120)  # accepts, never answers in time
    deadline_s = 10.0

    def ask(i: int) -> tuple[float, httpx.Response]:
        started = time.monotonic()
        r = client.post(
            "/v1/answer",
            json={"query": f"When is the sample corpus indexed? ({i})", "mode": "claude"},
            headers={"X-Request-Timeout": str(deadline_s)},
        )
        return time.monotonic() - started, r

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    answered_at = time.time()
    for took, r in results:
        assert r.status_code == 200, r.text
        body = r.json()
        assert took < deadline_s + MARGIN_S, took
        assert "deadline" in body["degraded"] and "claude" in body["deadline"]["cut"]
        assert body["answer"] and body["route"] == "slm"  # the SLM's answer, in time
        assert body["deadline"]["timeout_s"] == deadline_s
        assert body["deadline"]["used_s"] <= deadline_s
    time.sleep(3)
    late = [r for r in upstream.requests if r.at > answered_at]
    assert late == [], f"{len(late)} calls reached Claude after the responses"
    assert wait_reservations_released(client) == 0


def test_a_shorter_deadline_is_honoured_against_a_late_or_trickling_upstream(client, upstream):
    for fault in (Fault(delay_s=8), Fault(trickle_s=0.5)):
        upstream.always = fault
        started = time.monotonic()
        r = client.post(
            "/v1/answer",
            json={"query": "What port does the API use?", "mode": "claude", "timeout_s": 4},
        )
        took = time.monotonic() - started
        assert r.status_code == 200, r.text
        body = r.json()
        assert took < 4 + MARGIN_S and "deadline" in body["degraded"], (fault, took, body)
    assert wait_reservations_released(client) == 0


def test_a_deadline_too_short_for_anything_is_a_504(client):
    r = client.post(
        "/v1/answer",
        json={"query": "What port does the API use?"},
        headers={"X-Request-Timeout": "0.01"},
    )
    assert r.status_code == 504
    error = r.json()["error"]
    assert error["code"] == "deadline_exceeded" and "0.01 s" in error["message"]
    for bad in ("0", "-1", "soon", "1e9"):
        r = client.post("/v1/answer", json={"query": "q?"}, headers={"X-Request-Timeout": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_timeout"


def test_a_stream_that_reaches_its_deadline_ends_with_an_error_event(client, upstream):
    """Claude's plan hangs until the deadline; the local plan is sent; no time is left for its
    sub-tasks: the stream ends with an in-band 504 instead of hanging."""
    upstream.always = Fault(delay_s=120)
    started = time.monotonic()
    events = []
    with client.stream(
        "POST",
        "/v1/answer",
        json={
            "query": "Who is older, the retriever or the orchestrator?",
            "mode": "decompose",
            "stream": True,
            "timeout_s": 4,
        },
    ) as r:
        assert r.status_code == 200
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert time.monotonic() - started < 4 + MARGIN_S
    names = [n for n, _ in events]
    assert names[0] == "plan" and events[0][1]["planner"] == "local"
    if names[-1] == "error":
        assert events[-1][1]["error"]["code"] == "deadline_exceeded"
    else:  # a sub-task made it in time: the answer is partial, and says so
        assert names[-1] == "done" and "deadline" in events[-1][1]["degraded"]


def test_deadline_metrics_are_counted(app, client):
    r = client.post("/v1/answer", json={"query": "q?"}, headers={"X-Request-Timeout": "0.01"})
    assert r.status_code == 504
    deadline = time.monotonic() + 60
    while "ray_hybrid_serve_deadline_exceeded_total" not in httpx.get(app.metrics_url).text:
        assert time.monotonic() < deadline, "504s by deadline are not counted"
        time.sleep(2)
