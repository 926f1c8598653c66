"""Shadow verdicts: the log a replica appends, the kept-answer error rate with its interval, and
the threshold re-fitted from them (`hybrid-serve calibrate --from-log`)."""

import json
import random

import pytest

from hybrid_serve.agents.shadow import (
    Verdict,
    VerdictLog,
    kept_error_rate,
    read_verdicts,
    shadow_log_path,
)
from hybrid_serve.cluster.cli import main


def verdicts(n: int, seed: int = 0) -> list[Verdict]:
    """Kept answers (threshold 0.5) whose chance of being wrong falls with confidence."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = rng.uniform(0.5, 1.0)
        out.append(Verdict(i, f"t{i}", c, 0.5, 0.0, rng.random() < 0.4 * (1 - c) / 0.5))
    return out


def test_the_log_survives_a_torn_line_and_reads_back_in_order(tmp_path):
    a = VerdictLog(shadow_log_path(tmp_path, "Orchestrator#abc/1"))
    b = VerdictLog(shadow_log_path(tmp_path, "Orchestrator#def"))
    vs = verdicts(6)
    for v in vs:
        (a if v.at % 2 else b).append(v)
    with open(a.path, "a") as f:
        f.write('{"at": 99, "trace_id": "torn", "confi')  # a replica killed mid-write
    assert a.path.parent == tmp_path / "shadow" and "/" not in a.path.name
    assert read_verdicts([tmp_path / "shadow"]) == vs


def test_the_error_rate_interval_covers_the_rate():
    r = kept_error_rate([Verdict(i, "", 0.9, 0.5, 0.0, i < 10) for i in range(100)])
    assert (r.verdicts, r.wrong, r.rate) == (100, 10, 0.1)
    assert r.lower == pytest.approx(0.049, abs=0.002) and r.upper == pytest.approx(0.176, abs=0.002)
    assert kept_error_rate([]).upper == 1.0


def test_calibrate_from_log_refits_the_threshold(tmp_path):
    log = VerdictLog(tmp_path / "shadow" / "r.jsonl")
    for v in verdicts(2000):
        log.append(v)
    out = tmp_path / "cal"
    code = main(
        ["calibrate", "--from-log", str(tmp_path / "shadow"), "--alpha", "0.15", "--out", str(out)]
    )
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["feasible"] and report["threshold"] > 0.5
    assert report["observed"]["verdicts"] == 2000 and report["observed"]["thresholds_in_force"] == [
        0.5
    ]
    assert report["bound"] <= 0.15 and (out / "risk_control.png").is_file()
    assert main(["calibrate", "--from-log", str(tmp_path / "empty"), "--out", str(out)]) == 2
