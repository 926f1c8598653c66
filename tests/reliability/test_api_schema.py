"""The API against its own OpenAPI document, checked by a maintained schema-driven fuzzer:
Schemathesis generates valid and invalid requests for every operation from `/openapi.json`
(examples, coverage, fuzzing and stateful phases) and runs all of its checks — no 5xx, statuses,
content types, headers and bodies as documented, schema-valid data accepted and invalid data
rejected, Allow headers, authentication honoured — and a response time per operation
(schemathesis.toml), so a request that stalls the server fails the run. Then the bodies a
schema cannot describe, the cases the project's earlier hand-written generator found: invalid
UTF-8, JSON nested 50,000 deep, bodies over the limit, the wrong content type; and the inputs a
hostile client once used to step around the limits (deep metadata, thousands of tags, a query
split into parts), each refused naming its bound. The cluster answers normally afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


def test_schemathesis_finds_the_server_as_documented(rel, tmp_path):
    st = shutil.which("st") or shutil.which("schemathesis")
    assert st, "schemathesis is in the dev extra"
    started = time.monotonic()
    proc = subprocess.run(
        [
            st,
            "--config-file",
            str(Path(__file__).resolve().parents[2] / "schemathesis.toml"),
            "run",
            f"{rel.url}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {rel.key}",
            "--max-examples",
            str(int(rel.scaled(25, 400))),
            "--seed",
            "20261127",
            "--workers",
            "2",
            "--request-timeout",
            "120",
            "--generation-database",
            "none",
            "--no-color",
            "--output-sanitize",
            "false",  # the test's own key; the failures must show what was sent
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=int(rel.scaled(900, 7200)),
    )
    took = time.monotonic() - started
    (tmp_path / "schemathesis.txt").write_text(proc.stdout + proc.stderr)
    summary = proc.stdout[-6000:]
    print(summary, f"\n({took:.0f} s)")
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    assert "passed" in summary.lower()


@pytest.mark.parametrize(
    ("path", "content", "content_type", "status"),
    [
        ("/v1/answer", b'{"query": "\xff\xfe\xc3\x28"}', "application/json", 400),
        ("/v1/chat/completions", b'{"model": "slm", "messages": "\xff"}', "application/json", 400),
        ("/v1/documents", b"[" * 50_000 + b"]" * 50_000, "application/json", 400),
        ("/v1/answer", b"[" * 1000 + b"]" * 1000, "application/json", 400),
        ("/v1/answer", b'{"query": "' + b"x" * 2_000_100 + b'"}', "application/json", 413),
        ("/v1/answer", b"query=hi", "application/x-www-form-urlencoded", 400),
        ("/v1/answer", b"{", "application/json", 400),
        ("/v1/answer", b"", "application/json", 422),
    ],
    ids=[
        "invalid-utf8",
        "invalid-utf8-chat",
        "nested-50000",
        "nested-1000",
        "oversized",
        "form-encoded",
        "truncated-json",
        "empty",
    ],
)
def test_bodies_a_schema_cannot_describe_get_clear_errors(rel, path, content, content_type, status):
    with rel.client() as client:
        r = client.post(path, content=content, headers={"content-type": content_type})
    assert r.status_code == status, r.text[:300]
    assert r.json()["error"]["message"]


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/v1/documents", {"text": "x", "metadata": nested(300)}, "deeper than 8 levels"),
        ("/v1/documents", {"text": "x", "metadata": {"tags": ["t"] * 60_000}}, "limit is 16384"),
        ("/v1/documents", {"text": "x", "metadata": {"tags": ["t"] * 33}}, "the limit is 32"),
        ("/v1/documents", {"text": "x", "metadata": {"tags": ["t" * 65]}}, "64 characters"),
        (
            "/v1/documents",
            {"documents": [{"text": "x"}, {"text": "y", "metadata": {"tags": ["t"] * 33}}]},
            "documents.1.metadata: metadata.tags has 33 tags; the limit is 32",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "hybrid",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a " * 2000}] * 16}
                ],
            },
            "64000 characters; the limit is 4000",
        ),
        ("/v1/answer", {"query": "x" * 4001}, "the limit is 4000"),
    ],
    ids=["metadata-300-deep", "60000-tags", "33-tags", "long-tag", "batch", "16-parts", "query"],
)
def test_limits_are_on_what_the_server_uses_and_named(rel, path, body, named):
    """The cases a hostile client sent before the bounds: each is a 422 naming its limit."""
    with rel.client() as client:
        r = client.post(path, json=body)
    assert r.status_code == 422, r.text[:300]
    assert named in r.json()["error"]["message"]


def test_the_cluster_answers_after_the_fuzzing(rel):
    assert httpx.get(f"{rel.url}/readyz", timeout=30).status_code == 200
    with rel.client() as client:
        r = client.post("/v1/answer", json={"query": "What port does the API use?"})
        assert r.status_code == 200 and r.json()["answer"]
