"""Start-up proves the engine: `hybrid-serve up` stops with the cause when an SLM replica cannot
generate, `/readyz` counts replicas that die after starting, and `doctor` reports a crashing engine
as a failed check. The broken engines are in tests/support/faulty_engines.py.
"""

import json
import subprocess
import time

import httpx
import pytest

from tests.conftest import free_port, wait_ready
from tests.support.cli import CLI, STARTED, Up, clean_env, engine_env

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

# Serve gives up on a deployment after three failed replica starts; each costs a process start.
FAIL_WITHIN_S = 150


@pytest.mark.parametrize(
    ("engine", "cause"),
    [
        ("SegfaultEngine", "SIGSEGV"),
        ("RaisingEngine", "the kernel library refused this CPU"),
    ],
)
def test_up_exits_when_the_engine_cannot_generate(tmp_path, engine, cause):
    port = free_port()
    up = Up(tmp_path / "data", port, env=engine_env(f"tests.support.faulty_engines:{engine}"))
    started = time.monotonic()
    code = up.wait_exit(FAIL_WITHIN_S)
    took = time.monotonic() - started
    out = up.log.read_text()
    assert code == 1, out
    assert "start-up failed" in out and "SLM deployment could not start" in out, out
    assert cause in out, out
    assert "remedy:" in out, out
    assert "ready in" not in out and "serving on" not in out
    assert took < FAIL_WITHIN_S
    deadline = time.monotonic() + 30
    while up.leftover_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert up.leftover_processes() == [], "Ray processes left behind"


def test_readyz_counts_replicas_that_die_after_start(tmp_path):
    port = free_port()
    up = Up(
        tmp_path / "data",
        port,
        env=engine_env("tests.support.faulty_engines:CrashAfterWarmupEngine"),
    )
    try:
        up.wait_for(STARTED)
        slm = wait_ready(up.url)["components"]["slm"]
        assert slm["warmup"]["passed"] and "restarts" not in slm
        # The first real generation kills the replica: the request fails over HTTP, cleanly.
        r = httpx.post(f"{up.url}/v1/answer", json={"query": "What port?"}, timeout=120)
        assert r.status_code == 503 and r.json()["error"]["code"] == "replica_failed"
        deadline = time.monotonic() + 120
        while True:
            body = httpx.get(f"{up.url}/readyz", timeout=30).json()
            slm = body["components"]["slm"]
            if slm.get("restarts"):
                break
            assert time.monotonic() < deadline, body
            time.sleep(2)
        assert "SIGSEGV" in slm["last_death"]
        # Serve replaced it; the replacement passed its own warm-up.
        assert wait_ready(up.url, timeout=120)["components"]["slm"]["restarts"] >= 1
    finally:
        assert up.stop() == 0


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "doctor", "--json", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**clean_env(), **(env or {})},
    )


def test_doctor_lists_every_check(tmp_path):
    r = doctor(
        env={"HYBRID_SERVE_DATA_DIR": str(tmp_path), "HYBRID_SERVE_HTTP__PORT": str(free_port())}
    )
    report = json.loads(r.stdout)
    names = [c["name"] for c in report["checks"]]
    assert names == [
        "python",
        "packages",
        "cpu",
        "gpus",
        "faiss",
        "engine",
        "advice",
        "ray",
        "port",
        "index",
        "claude",
    ]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["advice"]["data"]["interactive"] in ("llama_cpp", "vllm")
    assert r.returncode == 0 and report["ok"], r.stdout
    assert checks["engine"]["status"] == "ok" and checks["engine"]["data"]["completion_tokens"] > 0
    assert checks["claude"]["status"] == "skip"  # no key: no call
    assert "amx" in checks["cpu"]["data"] and "avx2" in checks["cpu"]["data"]


def test_doctor_reports_a_crashing_engine_as_a_failed_check(tmp_path):
    env = {
        **engine_env("tests.support.faulty_engines:SegfaultEngine"),
        "HYBRID_SERVE_DATA_DIR": str(tmp_path),
    }
    r = doctor(env=env)
    report = json.loads(r.stdout)  # the doctor itself finished and printed its report
    engine = {c["name"]: c for c in report["checks"]}["engine"]
    assert engine["status"] == "fail" and "SIGSEGV" in engine["detail"]
    assert r.returncode == 1 and not report["ok"]
