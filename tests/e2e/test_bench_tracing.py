"""The tracing-overhead benchmark end to end, short: both arms answer, every traced request's
spans reach the receiver, none from the untraced arm. It starts its own cluster."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]


def test_tracing_benchmark_traces_one_arm_only(tmp_path):
    out = tmp_path / "tracing"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "RAY_", "OTEL_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_serve.benchmarks.tracing_overhead", "--requests", "4"]
        + ["--warmup", "1", "--latency-ms", "20", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["off"]["n"] == report["on"]["n"] == 4
    assert report["traced_requests_received"] == 4 and report["untraced_requests_exported"] == 0
    # the HTTP request, Lead.answer, Retriever.search, SLM.generate: all four, for every request
    assert report["spans_per_traced_request"] >= 4
    assert (out / "report.md").is_file() and (out / "tracing_overhead.png").stat().st_size > 0
