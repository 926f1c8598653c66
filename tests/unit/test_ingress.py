"""The ingress without a Ray replica: the FastAPI application and its routers over local
backends (a fixed retriever and SLM, the real answer cache and key limits), through httpx's ASGI
transport. What only the cluster can show — handles, replicas dying, Serve's back-pressure — is in
the integration and end-to-end tests."""

import asyncio
import json
from dataclasses import asdict
from typing import Any

import httpx
import numpy as np
import pytest

from hybrid_serve.agents.interfaces import LLMResult, Unavailable
from hybrid_serve.agents.limits import KeyLimits
from hybrid_serve.agents.roles import RewritePlan
from hybrid_serve.agents.semantic_cache import SemanticCache
from hybrid_serve.config import HybridServeConfig, deep_merge
from hybrid_serve.deployments import tunables as tunables_of
from hybrid_serve.deployments.ingress import Ingress
from hybrid_serve.deployments.orchestrator import create_app
from hybrid_serve.deployments.slm import SLMEndpoints
from hybrid_serve.schemas import GenerationRequest, GenerationResult, Passage

PASSAGES = [
    Passage(
        chunk_id="ports#0",
        doc_id="ports",
        title="Ports",
        text="The HTTP API listens on port 8000 by default.",
        score=0.03,
        dense_score=0.8,
    ),
    Passage(
        chunk_id="chunks#0",
        doc_id="chunks",
        title="Chunks",
        text="Documents are split into overlapping chunks of 180 words.",
        score=0.02,
        dense_score=0.4,
    ),
]
ADMIN, USER = "admin-key", "user-key"


class LocalBackend:
    """A deployment's methods in this process, called as the ingress calls a handle."""

    def __init__(self, target: Any, name: str) -> None:
        self.target, self.name = target, name

    async def call(self, method: str, *args: Any, read: bool = False) -> Any:
        result = getattr(self.target, method)(*args)
        return await result if asyncio.iscoroutine(result) else result

    async def stream(self, method: str, *args: Any):
        async for item in getattr(self.target, method)(*args):
            yield item


class Retriever:
    def __init__(self) -> None:
        self.version = 1

    async def search(self, query, top_k, collections=None):
        return PASSAGES[:top_k]

    async def search_versioned(self, query, top_k, collections=None):
        return PASSAGES[:top_k], self.version

    async def embed_versioned(self, text):
        vector = np.zeros(8, dtype=np.float32)
        vector[len(text) % 8] = 1.0
        return vector.tolist(), self.version

    def status(self):
        return {"ready": True, "version": self.version, "pid": 4242}


class SLM:
    """Answers from the passages; `fail_after` calls, refuses as an overloaded cluster would."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.fail_after = 0, fail_after

    async def generate(self, req):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Unavailable("overloaded", "the cluster is at capacity; retry shortly", 2.0)
        return GenerationResult(
            text="The HTTP API listens on port 8000 [1].",
            prompt_tokens=50,
            completion_tokens=9,
            token_logprobs=[-0.05] * 9,
            seconds=0.01,
        )

    async def generate_stream(self, req):
        result = await self.generate(req)
        for word in result.text.split(" "):
            yield word + " "
        yield result

    def status(self):
        return {"ready": True, "engine": "fake"}


class LLM:
    """The LLM proxy: usable (rewrites as asked) or without a key."""

    def __init__(self, usable: bool) -> None:
        self.usable, self.calls = usable, []

    async def call(self, role, request):
        self.calls.append(role)
        if not self.usable:
            raise Unavailable("claude_unavailable")
        plan = RewritePlan(rewritten_query=request.query, search_queries=[], steps=[])
        return LLMResult(output=plan)

    async def finish_request(self, *args):
        return None

    def status(self):
        reason = None if self.usable else "no_api_key"
        return {"ready": True, "available": self.usable, "reason": reason, "budget": 20.0}


class Cache:
    def __init__(self) -> None:
        self.cache = SemanticCache()

    def lookup(self, key, text, vector, version):
        return self.cache.lookup(key, text, np.asarray(vector, np.float32), version)

    def store(self, key, text, vector, answer, version, saved, owner=""):
        return self.cache.store(
            key, text, np.asarray(vector, np.float32), answer, version, saved, owner
        )

    def status(self):
        return {"ready": True, "entries": len(self.cache)}


class Keys:
    def __init__(self, cfg: HybridServeConfig) -> None:
        self.limits = KeyLimits(
            {k.label(): (k.requests_per_minute, k.daily_claude_budget_usd) for k in cfg.http.keys()}
        )

    def admit(self, label):
        return asdict(self.limits.admit(label))

    def record(self, *args):
        self.limits.record(*args)

    def report(self):
        return self.limits.report()

    def status(self):
        return {"ready": True}


def app_over(slm: SLM | None = None, llm: LLM | None = None, **overrides: Any):
    cfg = HybridServeConfig.load(overrides={"slm.max_tokens": 16, **overrides})
    ingress = Ingress(
        cfg,
        LocalBackend(Retriever(), "Retriever"),
        LocalBackend(slm or SLM(), "SLM"),
        LocalBackend(llm or LLM(usable=False), "ClaudeProxy"),
        LocalBackend(Cache(), "AnswerCache"),
        LocalBackend(Keys(cfg), "KeyLimits"),
    )
    app = create_app()
    app.state.ingress = ingress
    return app, ingress


def request(app, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        headers = {
            **kwargs.pop("headers", {}),
            **({"authorization": f"Bearer {key}"} if key else {}),
        }
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def sse_events(text: str) -> list[tuple[str, Any]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        out.append((lines.get("event", "message"), json.loads(lines["data"])))
    return out


def test_an_answer_over_local_backends():
    app, _ = app_over()
    r = request(app, "POST", "/v1/answer", json={"query": "Which port does the API use?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["route"] == "slm" and body["citations"][0]["doc_id"] == "ports"
    assert body["degraded"] == ["claude_unavailable"] and body["cache"] == "miss"


def test_a_cached_answer_streams_the_same_kinds_of_events_as_a_fresh_one():
    app, _ = app_over()
    body = {"query": "Which port, and how are documents split?", "mode": "decompose"}
    fresh = sse_events(request(app, "POST", "/v1/answer", json={**body, "stream": True}).text)
    cached = sse_events(request(app, "POST", "/v1/answer", json={**body, "stream": True}).text)
    assert cached[-1][1]["cache"] == "hit" and fresh[-1][1]["cache"] == "miss"
    kinds = [name for name, _ in fresh]
    assert kinds[0] == "plan" and kinds.count("subtask") == len(fresh[-1][1]["subtasks"])
    assert sorted(set(kinds)) == sorted({name for name, _ in cached})
    text = "".join(d["delta"] for n, d in cached if n == "answer")
    assert text == cached[-1][1]["answer"]


def test_an_overload_during_escalation_keeps_the_first_answer():
    """The second SLM call of an escalation is refused: the first answer stands, said so."""
    slm, llm = SLM(fail_after=1), LLM(usable=True)
    app, _ = app_over(slm, llm, **{"escalation.threshold": 1.0, "escalation.verify": "never"})
    r = request(app, "POST", "/v1/answer", json={"query": "Which port does the API use?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert llm.calls == ["rewrite"] and slm.calls == 2
    assert body["route"] == "slm" and "overloaded" in body["degraded"]
    assert body["answer"].startswith("The HTTP API listens on port 8000")


def test_an_overload_before_any_answer_is_a_503_with_retry_after():
    app, _ = app_over(SLM(fail_after=0))
    r = request(app, "POST", "/v1/answer", json={"query": "Which port does the API use?"})
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "overloaded"


class SlowEngine:
    """An engine with one slot that takes `seconds` a generation."""

    model_name = "slow"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.seen: list[GenerationRequest] = []

    def info(self):
        return {"contexts": 1, "in_flight": 0}

    async def generate(self, req):
        self.seen.append(req)
        await asyncio.sleep(self.seconds)
        return GenerationResult(
            text="The HTTP API listens on port 8000 [1].",
            prompt_tokens=50,
            completion_tokens=9,
            token_logprobs=[-0.05] * 9,
            seconds=self.seconds,
        )


def slow_slm(seconds: float) -> SLMEndpoints:
    """The SLM deployment's endpoints (its deadline queue included) over a slow engine."""
    endpoints = SLMEndpoints()
    endpoints.slm_engine = SlowEngine(seconds)  # type: ignore[assignment]
    endpoints.engine_kind = "fake"
    return endpoints


def test_at_capacity_what_cannot_finish_in_time_is_refused_at_once():
    """One slot, 0.3 s a generation, 1 s deadlines, 6 at once: those that fit are answered, the
    rest are refused at once with 503 and a Retry-After, none runs out its deadline (504)."""
    slm = slow_slm(0.3)
    app, _ = app_over(slm)
    body = {"query": "Which port does the API use?", "use_cache": False}

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            for _ in range(2):  # the replica measures its service time
                assert (await client.post("/v1/answer", json=body)).status_code == 200
            headers = {"x-request-timeout": "1", "x-priority": "batch"}
            return await asyncio.gather(
                *(client.post("/v1/answer", json=body, headers=headers) for _ in range(6))
            )

    responses = asyncio.run(go())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses and 504 not in statuses, statuses
    refused = [r for r in responses if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.json()["error"]["code"] == "overloaded" for r in refused)
    # Refused by the replica's queue, or on arrival right after it refused one like them
    # (before retrieval); each says why.
    messages = [r.json()["error"]["message"] for r in refused]
    by_replica = [m for m in messages if "after its deadline" in m]
    on_arrival = [m for m in messages if "the SLM refused a request of priority batch" in m]
    assert len(by_replica) + len(on_arrival) == len(refused) and by_replica, messages
    seen = slm.slm_engine.seen[-1]  # type: ignore[attr-defined]
    assert seen.priority == "batch" and 0 < seen.deadline_s < 1
    assert slm.queue.refused["batch"] == len(by_replica)


def test_an_unknown_priority_is_a_422_naming_the_values():
    app, _ = app_over()
    r = request(app, "GET", "/v1/models", headers={"x-priority": "urgent"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_priority"
    assert "interactive, batch" in r.json()["error"]["message"]


def test_keys_and_what_health_tells_a_stranger():
    keys = [{"key": ADMIN, "name": "ops", "admin": True}, {"key": USER, "name": "app"}]
    app, _ = app_over(**{"http.api_keys": keys})
    assert request(app, "GET", "/v1/models").status_code == 401
    assert request(app, "GET", "/v1/models", key=USER).status_code == 200
    stranger = request(app, "GET", "/readyz").json()
    assert stranger["ready"] and all(c == {"ready": True} for c in stranger["components"].values())
    admin = request(app, "GET", "/readyz", key=ADMIN).json()
    assert admin["components"]["retriever"]["pid"] == 4242
    mine = request(app, "GET", "/v1/usage", key=USER).json()
    assert set(mine) == {"keys"} and set(mine["keys"]) == {"app"}


def test_the_tunables_carry_key_digests_never_keys_and_apply_in_place():
    cfg = HybridServeConfig.load(overrides={"http.api_keys": [{"key": USER, "name": "app"}]})
    tunables = tunables_of.orchestrator(cfg)
    assert USER not in json.dumps(tunables)
    app, ingress = app_over()
    pipeline = ingress.pipeline
    updated = deep_merge(ingress.cfg.to_args(), {**tunables, "escalation": {"threshold": 0.9}})
    ingress.reconfigure(HybridServeConfig.from_args(updated))
    assert ingress.pipeline is pipeline and pipeline.cfg.escalation.threshold == 0.9
    assert request(app, "GET", "/v1/models", key=USER).status_code == 200
    assert request(app, "GET", "/v1/models").status_code == 401


@pytest.mark.parametrize("path", ["/v1/answer", "/v1/search"])
def test_bad_input_is_a_clear_4xx(path):
    app, _ = app_over(**{"http.max_query_chars": 10})
    r = request(app, "POST", path, json={"query": "x" * 11})
    assert r.status_code == 422 and "limit is 10" in r.json()["error"]["message"]


def test_the_length_limit_holds_for_a_message_split_into_parts():
    """The server joins a message's parts into one text: the limit is on that text."""
    app, _ = app_over(**{"http.max_query_chars": 10})
    parts = [{"type": "text", "text": "x" * 6}, {"type": "text", "text": "y" * 6}]
    body = {"model": "hybrid", "messages": [{"role": "user", "content": parts}]}
    r = request(app, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 422 and "12 characters; the limit is 10" in r.json()["error"]["message"]
    blocks = [{"type": "text", "text": "x" * 6}, {"type": "text", "text": "y" * 6}]
    body = {"model": "hybrid", "max_tokens": 16, "messages": [{"role": "user", "content": blocks}]}
    r = request(app, "POST", "/v1/messages", json=body)
    assert r.status_code == 422 and "limit is 10" in r.text


def test_a_reload_says_which_deployments_need_new_replicas():
    from hybrid_serve.deployments.app import restarts

    base = HybridServeConfig.load()
    tuned = {
        "escalation.threshold": 0.9,
        "http.max_query_chars": 20,
        "http.api_keys": [{"key": USER, "requests_per_minute": 5}],
        "llm.daily_budget_usd": 1.0,
        "policies.sensitive_tags": ["secret"],
        "cache.ttl_s": 10.0,
        "retriever.rrf_k": 9,
        "slm.max_tokens": 32,
    }
    assert restarts(base, HybridServeConfig.load(overrides=tuned)) == []
    assert restarts(base, HybridServeConfig.load(overrides={"slm.replicas": 2})) == ["SLM"]
    changed = HybridServeConfig.load(overrides={"llm.model": "other", "retriever.chunk_words": 90})
    assert restarts(base, changed) == ["ClaudeProxy", "Retriever"]
