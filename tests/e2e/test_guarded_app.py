"""A second application on the shared cluster with API keys and tiny queues: authentication,
admission control and Serve back-pressure."""

import asyncio
import hashlib
import time

import httpx
import openai
import pytest
from ray import serve

from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.app import build
from tests.conftest import wait_ready
from tests.support.ray_logs import ray_log_lines

pytestmark = pytest.mark.e2e

KEY = "hs-test-key-1234567890"
PREFIX = "/guarded"


@pytest.fixture(scope="module")
def guarded(app, tmp_path_factory):
    cfg = HybridServeConfig.load(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("guarded")),
            "http.port": app.cfg.http.port,
            # one plain key and one stored only as its hash
            "http.api_keys": ["other-key", "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()],
            "http.max_concurrent_requests": 6,
            "slm.max_ongoing_requests": 1,
            "slm.max_queued_requests": 1,
            "slm.max_tokens": 16,
            "retriever.index_sample_corpus": True,
        }
    )
    serve.run(build(cfg), name="guarded", route_prefix=PREFIX)
    url = app.url + PREFIX
    wait_ready(url)
    yield url
    serve.delete("guarded")


def test_every_route_but_health_needs_a_key(guarded):
    assert httpx.get(f"{guarded}/healthz").status_code == 200
    assert httpx.get(f"{guarded}/readyz").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/answer"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/messages"),
        ("GET", "/v1/documents/x"),
        ("DELETE", "/v1/documents/x"),
        ("POST", "/v1/documents"),
        ("GET", "/v1/usage"),
        ("GET", "/openapi.json"),
        ("GET", "/nope"),
    ]:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"x-api-key": "wrong"},
        ):
            r = httpx.request(method, guarded + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers)
            body = r.json()["error"]
            assert body["type"] == "authentication_error" and "other-key" not in r.text
            assert r.headers["www-authenticate"] == "Bearer"
    ok = httpx.get(f"{guarded}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    assert httpx.get(f"{guarded}/v1/models", headers={"x-api-key": KEY}).status_code == 200
    assert (
        httpx.get(f"{guarded}/v1/models", headers={"Authorization": "Bearer other-key"}).status_code
        == 200
    )


def test_openai_client_raises_authentication_error(guarded):
    bad = openai.OpenAI(base_url=f"{guarded}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in good.models.list()} == {"hybrid", "slm"}


def test_burst_gets_503_with_retry_after_and_nothing_hangs(guarded):
    async def one(client, i):
        r = await client.post(
            "/v1/answer", json={"query": f"What is hybrid-serve? ({i})", "mode": "slm"}
        )
        return r

    async def burst():
        async with httpx.AsyncClient(
            base_url=guarded, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
        ) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(14))), timeout=240
            )

    results = asyncio.run(burst())
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, codes
    for r in results:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            err = r.json()["error"]
            assert err["type"] == "overloaded_error" and "retry" in err["message"]


def test_keys_never_logged(guarded):
    """Read where the replicas log (the cluster's log files), not this process's loggers."""
    wrong = "wrong-" + KEY[::-1]
    for key in (KEY, wrong):
        httpx.get(f"{guarded}/v1/models", headers={"Authorization": f"Bearer {key}"})
        httpx.post(f"{guarded}/v1/search", json={"query": "q"}, headers={"x-api-key": key})
    time.sleep(1.0)  # the replicas' log lines reach their files
    lines = ray_log_lines()
    assert any("Orchestrator" in line for line in lines)  # the ingress's own log was read
    assert not [line for line in lines if KEY in line or wrong in line]


def test_schema_driven_fuzz_finds_no_5xx(guarded):
    """Bodies built from the OpenAPI document's own field names, with wrong and odd values."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    auth = {"Authorization": f"Bearer {KEY}"}
    spec = httpx.get(f"{guarded}/openapi.json", headers=auth).json()
    schemas = spec["components"]["schemas"]

    def fields(schema: dict) -> list[str]:
        if "$ref" in schema:
            schema = schemas[schema["$ref"].split("/")[-1]]
        names = list(schema.get("properties", {}))
        for sub in schema.get("anyOf", []) + schema.get("oneOf", []):
            names += fields(sub)
        return names

    routes = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            routes.append(
                (
                    method.upper(),
                    path.replace("{doc_id}", "fuzz-doc"),
                    fields(body.get("schema", {})) if body else [],
                )
            )
    assert any(p == "/v1/chat/completions" for _, p, _ in routes)

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
    )
    values = st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
        max_leaves=8,
    )

    @st.composite
    def request(draw):
        method, path, names = draw(st.sampled_from(routes))
        keys = st.sampled_from(names + ["junk", "top_k", "model"]) if names else st.text(max_size=5)
        body = draw(
            st.one_of(
                st.dictionaries(keys, values, max_size=5),
                values,
                st.binary(max_size=40).map(lambda b: b"\xff\xfe" + b),  # invalid UTF-8
                st.integers(1, 60).map(lambda n: b"[" * n + b"]" * n),  # nested
            )
        )
        return method, path, body

    client = httpx.Client(base_url=guarded, headers=auth, timeout=120)

    @settings(
        max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(request())
    def check(req):
        method, path, body = req
        if isinstance(body, bytes):
            r = client.request(
                method, path, content=body, headers={"content-type": "application/json"}
            )
        else:
            r = client.request(method, path, json=body)
        assert r.status_code < 500 or r.status_code == 503, (method, path, body, r.text)
        if r.status_code >= 400:
            assert "error" in r.json()

    check()
    assert httpx.get(f"{guarded}/readyz").status_code == 200  # healthy afterwards
