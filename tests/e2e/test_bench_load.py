"""`hybrid-serve bench load` against the live local app: a short open-loop run and a streamed
closed-loop run each write a complete report and the plots."""

import json

import pytest

from hybrid_serve.cluster.cli import main

pytestmark = pytest.mark.e2e

FIELDS = {
    "throughput_rps",
    "goodput_rps",
    "refusals",
    "latency_ms",
    "errors",
    "routes",
    "capacity_plan",
    "ttft_ms",
}


def test_open_loop_run_writes_report_and_plots(app, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query": "What port does the HTTP API use?", "mode": "slm"}\n')
    out = tmp_path / "open"
    code = main(
        [
            "bench",
            "load",
            "--url",
            app.url,
            "--rate",
            "1",
            "--duration",
            "4",
            "--warmup",
            "1",
            "--queries",
            str(queries),
            "--slo-p95-ms",
            "60000",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert FIELDS <= set(report) and report["mode"] == "open"
    assert report["requests"]["ok"] >= 1 and report["errors"] == {}
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert set(report["routes"]) == {"slm"} and report["routes"]["slm"]["share"] == 1.0
    assert report["routes"]["slm"]["tokens"]["slm"] > 0
    plan = report["capacity_plan"]
    assert plan["feasible"] and plan["replicas"] >= 1 and plan["cost_per_1k_usd"]["all_claude"] > 0
    # The answers' SLM costs add up to the replica's busy time at its price (llama.cpp: one
    # context; what the replica spent outside a generation's own clock is the gap).
    check = report["replica_time"]
    assert check is not None and check["checked"]
    assert check["generations"] >= report["requests"]["ok"]
    assert 0.8 <= check["answers_over_busy"] <= 1.02, check
    for png in ("latency_vs_load.png", "throughput_vs_load.png", "cost_per_1k.png"):
        assert (out / png).stat().st_size > 1000
    assert "Capacity plan" in (out / "report.md").read_text()


def test_closed_loop_streaming_measures_time_to_first_token(app, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query": "How are citations numbered?", "mode": "slm"}\n')
    out = tmp_path / "closed"
    code = main(
        [
            "bench",
            "load",
            "--url",
            app.url,
            "--concurrency",
            "1",
            "--duration",
            "60",
            "--warmup",
            "0",
            "--max-requests",
            "2",
            "--stream",
            "--queries",
            str(queries),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "closed" and report["requests"]["sent"] == 2
    ttft, lat = report["ttft_ms"], report["latency_ms"]
    assert ttft["p50"] is not None and 0 < ttft["p50"] <= lat["p50"]


def test_bad_queries_file_is_a_clear_error(app, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    code = main(
        [
            "bench",
            "load",
            "--url",
            app.url,
            "--rate",
            "1",
            "--duration",
            "1",
            "--queries",
            str(bad),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and "error" in capsys.readouterr().err
