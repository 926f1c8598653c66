"""`hybrid-serve up`, `ask` and `index add` as a user runs them, in subprocesses.

These start their own cluster, so they run before the shared one (see conftest).
"""

import re
import signal
import subprocess
import time

import httpx
import pytest

from tests.conftest import free_port, wait_ready
from tests.support.cli import CLI, STARTED, Up, clean_env

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean_env(), "COLUMNS": "200"},
    )


def test_up_ask_index_add_restart(tmp_path):
    data = tmp_path / "data"
    port, metrics_port = free_port(), free_port()
    up = Up(data, port, "--metrics-port", str(metrics_port))
    try:
        out = up.wait_for(STARTED)
        assert f"http://127.0.0.1:{port}" in out and "ready in" in out
        assert f"http://127.0.0.1:{metrics_port}/metrics" in out
        assert out.count("no API keys configured") == 1
        first = wait_ready(up.url)["components"]["retriever"]
        assert first["documents"] == 8  # the bundled sample corpus, indexed on first start

        asked = run("ask", "How do I add documents?", "--url", up.url)
        assert asked.returncode == 0, asked.stderr
        assert "route slm" in asked.stdout and "confidence" in asked.stdout
        assert "degraded: claude_unavailable" in asked.stdout  # no key: SLM answers, says so
        # The answer is counted on Ray's Prometheus endpoint, where the flag put it.
        deadline = time.monotonic() + 60
        answered = re.compile(r'ray_hybrid_serve_requests_total\{[^}]*endpoint="/v1/answer"')
        while not answered.search(
            httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        ):
            assert time.monotonic() < deadline, "the answer was not counted"
            time.sleep(2)

        docs = tmp_path / "docs"
        (docs / "sub").mkdir(parents=True)
        (docs / "owls.md").write_text("# Owls\n\nOwls hunt at night and swallow prey whole.\n")
        (docs / "sub" / "bats.txt").write_text("Bats navigate by echolocation.\n")
        (docs / "ignored.bin").write_bytes(b"\x00\x01")
        (docs / "kb.jsonl").write_text(
            '{"doc": 7, "body": "Moths are drawn to lamps.", "meta": {"tags": ["kb"]}}\n'
            "{broken\n"
            '{"doc": "shrews", "body": "Shrews eat their weight daily."}\n'
        )
        missing = tmp_path / "missing.md"
        added = run(
            "index", "add", str(docs), str(missing), "--url", up.url,
            "--id-field", "doc", "--text-field", "body", "--metadata-field", "meta",
        )  # fmt: skip
        assert added.returncode == 1  # one path and one record failed ...
        assert str(missing) in added.stderr and "no such file" in added.stderr
        assert f"{docs / 'kb.jsonl'}:2: invalid JSON" in added.stderr.replace("\n", "")
        assert "added 4 document(s)" in added.stdout  # ... and the others were still ingested
        moths = httpx.get(f"{up.url}/v1/documents/7").json()
        assert moths["metadata"] == {"tags": ["kb"]} and moths["text"].startswith("Moths")
        again = run("index", "add", str(docs / "owls.md"), "--url", up.url)
        assert again.returncode == 0
        status = httpx.get(f"{up.url}/readyz").json()["components"]["retriever"]
        assert status["documents"] == 12  # re-adding replaced, did not duplicate

        # The Ray Data pipeline (on a Ray instance of its own: `up` runs a private one) writes
        # the server's index; the server serves it on its next read.
        bulk = tmp_path / "bulk.jsonl"
        bulk.write_text(
            "".join(
                f'{{"id": "bulk-{i}", "title": "Note {i}", "text": "Note {i} says zq{i}x."}}\n'
                for i in range(40)
            )
        )
        piped = run("index", "add", str(bulk), "--bulk", "--data-dir", str(data), timeout=600)
        assert piped.returncode == 0, piped.stderr[-2000:]
        assert f"bulk ingestion into {data / 'index'}" in piped.stdout
        assert "added 40 document(s)" in piped.stdout
        status = httpx.get(f"{up.url}/readyz").json()["components"]["retriever"]
        assert status["documents"] == 52
        hits = httpx.post(f"{up.url}/v1/search", json={"query": "zq17x", "top_k": 1}).json()
        assert hits["passages"][0]["doc_id"] == "bulk-17"
        resumed = run("index", "add", str(bulk), "--bulk", "--data-dir", str(data), timeout=600)
        assert resumed.returncode == 0 and "40 already indexed" in resumed.stdout
        assert "embedding on" not in resumed.stdout  # nothing to embed: Ray not even started
        version = httpx.get(f"{up.url}/readyz").json()["components"]["retriever"]["version"]
    finally:
        code = up.stop()
    assert code == 0
    assert "stopped" in up.log.read_text()

    # Restart on the same data: same index version, nothing re-indexed.
    config = tmp_path / "hybrid.yaml"
    config.write_text("http:\n  max_query_chars: 4000\n")
    up2 = Up(data, port, "--config", str(config))
    try:
        up2.wait_for(STARTED)
        status = wait_ready(up2.url)["components"]["retriever"]
        assert status["version"] == version and status["documents"] == 52
        assert status["progress"] == {}  # the sample corpus was not indexed again
        r = httpx.post(
            f"{up2.url}/v1/answer", json={"query": "How do owls eat their prey?"}, timeout=120
        )
        assert r.status_code == 200

        # A changed configuration, reloaded: in force at once, the SLM replica kept.
        before = wait_ready(up2.url)["components"]["slm"]["placement"]["pid"]
        config.write_text("http:\n  max_query_chars: 20\nescalation:\n  threshold: 0.7\n")
        reloaded = run("reload", "--data-dir", str(data))
        assert reloaded.returncode == 0, reloaded.stderr
        out = up2.wait_for("reloaded in", timeout=120)
        assert "no new replicas" in out
        long = {"query": "How do owls eat their prey at night?"}
        refused = httpx.post(f"{up2.url}/v1/answer", json=long, timeout=60)
        assert refused.status_code == 422 and "limit is 20" in refused.text
        assert wait_ready(up2.url)["components"]["slm"]["placement"]["pid"] == before
    finally:
        assert up2.stop(signal.SIGTERM) == 0  # as `docker stop` or Kubernetes stop it
    assert "stopped" in up2.log.read_text()


def test_up_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("up", "--port", str(port), "--data-dir", str(tmp_path), timeout=60)
    assert r.returncode == 1 and f"port {port}" in r.stderr and "in use" in r.stderr


def test_ask_without_server_says_so():
    r = run("ask", "anything", "--url", f"http://127.0.0.1:{free_port()}", timeout=60)
    assert r.returncode == 1 and "cannot reach" in r.stderr
