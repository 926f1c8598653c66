"""Bad input at scale: thousands of seeded cases over every route of the OpenAPI document —
wrong types, huge and negative numbers, unknown models, invalid UTF-8, deeply nested JSON,
oversized bodies and strings — with no 5xx, no hang, and a healthy cluster afterwards."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

ODD_NUMBERS = [0, -1, -(2**31), 2**31, 2**63, 2**80, -(2**80), 1e308, -1e-308, 0.5, 10**9]
ODD_STRINGS = ["", " ", "\x00", "é" * 50, "\ud7ff", "🦉" * 20, "a" * 5000, "<script>", "{{s1}}"]


def _fields(schema: dict, schemas: dict) -> list[str]:
    if "$ref" in schema:
        schema = schemas[schema["$ref"].split("/")[-1]]
    names = list(schema.get("properties", {}))
    for sub in schema.get("anyOf", []) + schema.get("oneOf", []) + schema.get("allOf", []):
        names += _fields(sub, schemas)
    for prop in schema.get("properties", {}).values():
        if "$ref" in prop or "items" in prop:
            names += _fields(prop.get("items", prop), schemas)
    return list(dict.fromkeys(names))


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice(ODD_NUMBERS)
    if kind == 3:
        return rng.choice(ODD_STRINGS)
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 40)))
    if kind == 5:
        return rng.uniform(-1e6, 1e6)
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(ODD_STRINGS[:6]): _value(rng, depth + 1) for _ in range(rng.randrange(3))}


def _case(rng: random.Random, routes: list[tuple[str, str, list[str]]], limit: int):
    """(method, path, content bytes, content type)."""
    method, path, names = rng.choice(routes)
    path = path.replace("{doc_id}", rng.choice(["fuzz-doc", "..%2F..%2Fetc", "a" * 300, "%00"]))
    kind = rng.randrange(10)
    if kind == 0:  # invalid UTF-8
        return method, path, b'{"query": "\xff\xfe\xc3\x28"}', "application/json"
    if kind == 1:  # deeply nested
        depth = rng.choice([100, 1000, 50_000])
        return method, path, b"[" * depth + b"]" * depth, "application/json"
    if kind == 2:  # oversized
        return method, path, b'{"query": "' + b"x" * (limit + 10) + b'"}', "application/json"
    if kind == 3:  # not JSON at all, or the wrong content type
        return (
            method,
            path,
            rng.choice([b"query=hi", b"{", b"NaN", b""]),
            rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"]),
        )
    body: dict[str, Any] = {}
    for _ in range(rng.randrange(1, 6)):
        key = rng.choice(names + ["top_k", "model", "max_tokens", "junk"]) if names else "junk"
        body[key] = _value(rng)
    if kind == 4 and names:  # mostly right, one field wrong
        body = {"query": "What port does the API use?", "mode": "slm", "verify": "never"}
        body[rng.choice(names)] = _value(rng)
    if kind == 5:
        body["model"] = rng.choice(["gpt-4o", "", "hybrid ", "HYBRID", "slm\x00"])
        body["messages"] = rng.choice([[], [{"role": "user", "content": "hi"}], "hi", [{}]])
    if kind == 6:
        body["top_k"] = rng.choice([0, -5, 10**9, 2**70, "5", 5.5])
    return (
        method,
        path,
        json.dumps(body, ensure_ascii=rng.random() < 0.5).encode(),
        ("application/json"),
    )


def test_thousands_of_bad_requests_get_clear_errors_and_the_cluster_stays_healthy(rel):
    spec = httpx.get(f"{rel.url}/openapi.json", headers=rel.auth).json()
    schemas = spec["components"]["schemas"]
    routes = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            routes.append((method.upper(), path, _fields(content.get("schema", {}), schemas)))
    assert {p for _, p, _ in routes} >= {"/v1/answer", "/v1/search", "/v1/chat/completions"}
    limit = 2_000_000  # http.max_body_bytes default
    rng = random.Random(1234)
    total = int(rel.scaled(2000, 20000))
    cases = [_case(rng, routes, limit) for _ in range(total)]
    problems: list[tuple] = []
    statuses: dict[int, int] = {}

    async def worker(client: httpx.AsyncClient, queue: asyncio.Queue) -> None:
        while not queue.empty():
            method, path, content, ctype = queue.get_nowait()
            try:
                r = await client.request(
                    method, path, content=content, headers={"content-type": ctype}
                )
            except httpx.TimeoutException:
                problems.append(("hang", method, path, content[:80]))
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500 and r.status_code != 503:
                problems.append((r.status_code, method, path, content[:80], r.text[:200]))
            elif r.status_code >= 400:
                try:
                    assert "error" in r.json()
                except (ValueError, AssertionError):
                    problems.append(("no JSON error", r.status_code, method, path, r.text[:200]))

    async def main() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for case in cases:
            queue.put_nowait(case)
        async with httpx.AsyncClient(base_url=rel.url, headers=rel.auth, timeout=30) as client:
            await asyncio.gather(*(worker(client, queue) for _ in range(8)))

    asyncio.run(main())
    print(dict(sorted(statuses.items())))
    assert not problems, problems[:5]
    assert sum(statuses.values()) == total
    assert statuses.get(422, 0) > total / 4 and statuses.get(413, 0) > 0  # it did reach the checks
    assert httpx.get(f"{rel.url}/readyz", timeout=30).status_code == 200
    with rel.client() as client:
        r = client.post("/v1/answer", json={"query": "What port does the API use?"})
        assert r.status_code == 200 and r.json()["answer"]
