"""A second application on the shared cluster with the answer cache on and API keys with their
own limits: hits on repeated and paraphrased questions, misses after an index write and after
the TTL; a key over its request rate, a key over its Claude budget, usage per key."""

import json
import re
import time
from pathlib import Path

import anthropic
import httpx
import pytest
from ray import serve

from hybrid_serve.cluster.cli import main
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.app import build
from tests.conftest import wait_ready

pytestmark = pytest.mark.e2e

PREFIX = "/teams"
ADMIN, LIMITED, THRIFTY = "admin-key-0001", "limited-key-0002", "thrifty-key-0003"
TTL_S = 6.0
Q = "How do I add documents?"


@pytest.fixture(scope="module")
def teams_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teams")


@pytest.fixture(scope="module")
def teams(app, teams_dir):
    cfg = HybridServeConfig.load(
        overrides={
            "data_dir": str(teams_dir),
            "http.port": app.cfg.http.port,
            "http.api_keys": [
                {"key": ADMIN, "name": "ops", "admin": True},
                {"key": LIMITED, "name": "team-a", "requests_per_minute": 3},
                {"key": THRIFTY, "name": "team-b", "daily_claude_budget_usd": 0.0001},
            ],
            "cache.ttl_s": TTL_S,
            # every answer in mode auto is kept on the SLM, and every kept one graded afterwards
            "escalation.threshold": 0.0,
            "escalation.shadow_verify_share": 1.0,
            "slm.max_tokens": 24,
            "retriever.index_sample_corpus": True,
        }
    )
    serve.run(build(cfg), name="teams", route_prefix=PREFIX)
    url = app.url + PREFIX
    wait_ready(url)
    yield url
    serve.delete("teams")


def ask(url: str, query: str, key: str = ADMIN, **body) -> httpx.Response:
    r = httpx.post(
        f"{url}/v1/answer",
        json={"query": query, "mode": "slm", **body},
        headers={"x-api-key": key},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-hybrid-serve-cache"] == r.json()["cache"]
    return r


def test_repeats_and_paraphrases_hit_until_the_ttl(teams):
    first = ask(teams, Q).json()
    assert first["cache"] == "miss" and first["usage"]["slm_completion_tokens"] > 0
    time.sleep(0.5)  # the store is not awaited by the response
    again = ask(teams, "how do i add documents").json()
    assert again["cache"] == "hit" and again["answer"] == first["answer"]
    assert again["usage"]["slm_completion_tokens"] == 0 and again["trace_id"] != first["trace_id"]
    assert ask(teams, "How can I add documents?").json()["cache"] == "hit"  # cosine 0.99
    assert ask(teams, "How do I delete documents?").json()["cache"] == "miss"
    assert ask(teams, Q, mode="auto").json()["cache"] == "miss"  # other options, other entry
    r = httpx.post(
        f"{teams}/v1/answer",
        json={"query": Q, "mode": "slm"},
        headers={"x-api-key": ADMIN, "cache-control": "no-cache"},
        timeout=120,
    )
    assert r.json()["cache"] == "bypass" and r.headers["x-hybrid-serve-cache"] == "bypass"
    assert ask(teams, Q, sensitive=True).json()["cache"] == "bypass"
    time.sleep(TTL_S)
    assert ask(teams, Q).json()["cache"] == "miss"


def test_an_index_write_empties_the_cache_for_every_api(teams):
    ac = anthropic.Anthropic(base_url=teams, api_key=ADMIN, max_retries=0, timeout=120)
    kwargs = dict(
        model="slm",
        max_tokens=24,
        messages=[{"role": "user", "content": "What is hybrid-serve?"}],
    )
    assert ac.messages.create(**kwargs).model_extra["hybrid"]["cache"] == "miss"
    time.sleep(0.5)
    raw = ac.messages.with_raw_response.create(**kwargs)
    assert raw.headers["x-hybrid-serve-cache"] == "hit"
    assert raw.parse().usage.output_tokens == 0
    r = httpx.post(
        f"{teams}/v1/documents",
        json={"id": "new", "text": "hybrid-serve now also ships a cache."},
        headers={"x-api-key": ADMIN},
    )
    assert r.status_code == 201
    assert ac.messages.create(**kwargs).model_extra["hybrid"]["cache"] == "miss"


def test_a_key_over_its_rate_gets_429_with_retry_after(teams):
    statuses, retry_after = [], None
    ac = anthropic.Anthropic(base_url=teams, api_key=LIMITED, max_retries=0, timeout=120)
    for i in range(5):
        try:
            ac.messages.create(
                model="slm",
                max_tokens=8,
                messages=[{"role": "user", "content": f"What is Ray Serve? ({i})"}],
            )
            statuses.append(200)
        except anthropic.RateLimitError as exc:
            statuses.append(429)
            retry_after = exc.response.headers["retry-after"]
            assert exc.body["error"]["type"] == "rate_limit_error"
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
    assert 1 <= int(retry_after) <= 20  # a token per 20 s at 3 per minute
    # another key is not held back by it
    assert ask(teams, "What is Ray Serve?").status_code == 200


def test_a_key_over_its_claude_budget_is_answered_locally(teams, app):
    app.claude.reset()
    first = ask(teams, "Explain chunk overlap.", key=THRIFTY, mode="claude", verify="never")
    assert first.json()["route"] == "claude" and first.json()["usage"]["cost_usd"] > 0.0001
    sent = len(app.claude.calls())
    second = ask(teams, "Explain the ledger.", key=THRIFTY, mode="claude", verify="never").json()
    assert "key_budget_exhausted" in second["degraded"] and second["route"] == "slm"
    assert len(app.claude.calls()) == sent  # nothing more went to Claude for this key
    other = ask(teams, "Explain the ledger.", key=ADMIN, mode="claude", verify="never").json()
    assert other["route"] == "claude" and not other["degraded"]


def test_usage_per_key(teams):
    time.sleep(0.5)  # usage is recorded after the response
    mine = httpx.get(f"{teams}/v1/usage", headers={"x-api-key": THRIFTY}).json()["keys"]
    assert set(mine) == {"team-b"}  # a key sees its own line
    everyone = httpx.get(f"{teams}/v1/usage", headers={"x-api-key": ADMIN}).json()
    keys = everyone["keys"]
    assert set(keys) == {"ops", "team-a", "team-b"}
    assert keys["team-b"]["claude_budget_remaining_usd"] == 0.0
    assert keys["team-b"]["budget_degraded"] >= 1 and keys["ops"]["cache_hits"] >= 3
    assert keys["team-a"]["rate_limited"] >= 2 and keys["team-a"]["requests_per_minute"] == 3
    assert everyone["cache"]["hits"] >= 3 and everyone["cache"]["saved_usd"] > 0
    text = "".join(str(v) for v in keys.values())
    assert ADMIN not in text and LIMITED not in text  # labels only, never keys


def test_kept_answers_are_graded_by_claude_in_the_background(teams, teams_dir, app, tmp_path):
    app.claude.reset()
    body = ask(teams, "What does the retriever do?", mode="auto", use_cache=False).json()
    assert body["route"] == "slm" and body["verification"] is None
    assert body["usage"]["claude_calls"] == 0  # the grade is not the request's
    deadline = time.monotonic() + 60
    while not app.claude.calls("grade_answer"):
        assert time.monotonic() < deadline, "no shadow verification reached Claude"
        time.sleep(0.5)
    logs = list((teams_dir / "shadow").glob("*.jsonl"))
    while not any(body["trace_id"] in f.read_text() for f in logs):
        assert time.monotonic() < deadline, "the verdict was not logged"
        time.sleep(0.5)
        logs = list((teams_dir / "shadow").glob("*.jsonl"))
    verdict = next(
        json.loads(line)
        for f in logs
        for line in f.read_text().splitlines()
        if body["trace_id"] in line
    )
    assert verdict["score"] == 0.9 and verdict["wrong"] is False  # the test server's grade
    assert verdict["confidence"] == body["confidence"]
    counted = re.compile(r'ray_hybrid_serve_shadow_verdicts_total\{[^}]*verdict="right"')
    while not counted.search(httpx.get(app.metrics_url, timeout=10).text):
        assert time.monotonic() < deadline + 60, "shadow verdicts not counted"
        time.sleep(2)
    # The threshold re-fitted from the log: one verdict certifies nothing, and says so.
    out = tmp_path / "cal"
    assert main(["calibrate", "--from-log", str(teams_dir / "shadow"), "--out", str(out)]) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["observed"]["verdicts"] >= 1 and report["feasible"] is False
    # Sensitive requests are never graded.
    app.claude.reset()
    ask(teams, "What does the retriever do?", mode="auto", sensitive=True, use_cache=False)
    time.sleep(2)
    assert app.claude.calls("grade_answer") == []
