"""`hybrid-serve bench quality` as a user runs it: it starts its own cluster with a fresh index
built from the data files, so it runs before the shared cluster exists."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import shared_file

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]


def test_quality_run_on_both_data_files_writes_every_output(tmp_path):
    # Four SQuAD articles (~190 paragraphs, ~1,000 questions) rather than the file's 24: the same
    # format and code path at a fraction of the indexing time.
    full = json.loads(shared_file("data/squad/squad-v1.1-dev-part-a.json").read_text())
    squad = tmp_path / "squad-4-articles.json"
    squad.write_text(json.dumps({**full, "data": full["data"][:4]}))
    # Likewise the first 12 HotpotQA questions and their paragraphs (8 are asked).
    questions = json.loads(
        shared_file("data/hotpotqa/hotpotqa-dev-distractor-0-59.json").read_text()
    )
    hotpot = tmp_path / "hotpot-12.json"
    hotpot.write_text(json.dumps(questions[:12]))
    out = tmp_path / "quality"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "RAY_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid_serve.cluster.cli",
            "bench",
            "quality",
            "--squad",
            str(squad),
            "--hotpot",
            str(hotpot),
            "--limit",
            "8",
            "--retrieval-limit",
            "100",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("recall_at_1", "recall_at_5", "recall_at_10"):
        assert 0 <= report["retrieval"][key] <= 1
    r = report["retrieval"]
    # 100 SQuAD questions (--retrieval-limit) and 8 HotpotQA ones (its rows follow --limit)
    assert r["recall_at_1"] <= r["recall_at_5"] <= r["recall_at_10"] and r["n"] == 108
    assert r["recall_at_5"] > 0.5  # real retrieval over the real corpus, not a fake ranking
    assert 0 <= report["answer"]["exact_match"] <= report["answer"]["f1"] <= 1
    assert 0 <= report["citations"]["precision"] <= 1 and 0 <= report["citations"]["recall"] <= 1
    assert 0 <= report["escalation_rate"] <= 1 and report["routes"] == {"slm": 1.0}
    assert (
        report["claude_measured"] is False
        and report["cost"]["all_claude_usd_per_question_estimate"] > 0
    )
    assert set(report["datasets"]) == {"squad", "hotpot"}
    assert (
        report["datasets"]["squad"]["slm"]["n"] == 8
        and report["datasets"]["hotpot"]["slm"]["n"] == 8
    )
    assert report["latency"]["ingest_paragraphs_per_s"] > 0
    assert len(report["calibration"]["curve"]) == 5
    for name in ("report.md", "cost_quality.png", "retrieval_recall.png"):
        assert (out / name).stat().st_size > 500
