"""The quality harness's own arithmetic: datasets to corpus, citation precision/recall in the
ALCE sense (a citation is right when it is a gold passage), thresholds and calibration."""

import json

from hybrid_serve.benchmarks.quality import (
    Outcome,
    Question,
    calibrate,
    citation_scores,
    hotpot,
    routing,
    routing_markdown,
    squad,
    summarize,
    threshold_for,
)


def test_squad_and_hotpot_become_a_corpus_with_gold_ids(tmp_path):
    sq = tmp_path / "squad.json"
    sq.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "title": "Super_Bowl",
                        "paragraphs": [
                            {
                                "context": "Denver won.",
                                "qas": [{"question": "Who won?", "answers": [{"text": "Denver"}]}],
                            }
                        ],
                    }
                ]
            }
        )
    )
    docs, qs = squad(sq)
    assert docs == [{"id": "squad-0-0", "title": "Super Bowl", "text": "Denver won."}]
    assert qs[0].gold == {"squad-0-0"} and qs[0].answers == ["Denver"]
    hp = tmp_path / "hotpot.json"
    row = {
        "question": "Q?",
        "answer": "yes",
        "supporting_facts": {"title": ["A", "B", "A"], "sent_id": [0, 0, 1]},
        "context": {"title": ["A", "B", "C"], "sentences": [["a1 ", "a2"], ["b"], ["c"]]},
    }
    hp.write_text(json.dumps([row]))
    docs, qs = hotpot(hp, None, 0)
    assert {d["id"] for d in docs} == {"hotpot:A", "hotpot:B", "hotpot:C"}
    assert next(d for d in docs if d["id"] == "hotpot:A")["text"] == "a1 a2"
    assert qs[0].gold == {"hotpot:A", "hotpot:B"}


def test_citation_precision_and_recall_by_hand():
    cites = [{"doc_id": "a"}, {"doc_id": "x"}, {"doc_id": "a"}, {"doc_id": "b"}]
    assert citation_scores(cites, {"a", "b", "c"}) == (3, 4, 2)
    assert citation_scores([], {"a"}) == (0, 0, 0)


def test_threshold_splits_at_the_target_fraction():
    conf = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    t = threshold_for(conf, 0.3)
    assert sum(c < t for c in conf) == 3
    assert sum(c < threshold_for(conf, 0.0) for c in conf) == 0
    assert sum(c < threshold_for(conf, 1.0) for c in conf) == 10


def answer(text: str, confidence: float, doc: str, cost: float = 0.0) -> dict:
    return {
        "answer": text,
        "confidence": confidence,
        "citations": [{"doc_id": doc}],
        "route": "slm",
        "escalation": {"escalated": False},
        "usage": {"cost_usd": cost, "slm_cost_usd": 0.001, "all_claude_cost_usd_estimate": 0.01},
        "_latency_ms": 100.0,
    }


def outcomes(with_claude: bool) -> list[Outcome]:
    out = []
    for i in range(20):
        q = Question("squad", f"q{i}?", [f"ans{i}"], {f"d{i}"})
        right = i % 2 == 0  # the confident half is right
        slm = answer(f"ans{i} [1]" if right else "wrong [1]", 0.9 if right else 0.2, f"d{i}")
        claude = answer(f"ans{i} [1]", 1.0, f"d{i}", cost=0.02) if with_claude else None
        out.append(Outcome(q, [f"d{i}", "other"], slm=slm, claude=claude))
    return out


def test_calibration_curve_with_both_ends_measured():
    cal = calibrate(outcomes(with_claude=True), seed=0)
    assert cal["claude_quality_measured"] is True
    by_target = {p["target_escalation"]: p for p in cal["curve"]}
    assert by_target[0.0]["escalation_rate"] == 0.0
    assert by_target[1.0]["escalation_rate"] == 1.0 and by_target[1.0]["f1"] == 1.0
    # Escalating the low-confidence (wrong) answers raises quality and cost together.
    assert by_target[0.3]["f1"] >= by_target[0.0]["f1"]
    assert by_target[0.3]["cost_usd_per_question"] >= by_target[0.0]["cost_usd_per_question"]


def test_summary_without_claude_says_what_the_threshold_would_escalate():
    run = {
        "outcomes": outcomes(with_claude=False),
        "ingest_docs_per_s": 30.0,
        "search_ms": [5.0, 7.0],
        "with_claude": False,
    }
    report = summarize(run, threshold=0.5, seed=0, files={"squad": "x.json"})
    assert report["retrieval"]["recall_at_1"] == 1.0 and report["retrieval"]["n"] == 20
    assert report["answer"]["exact_match"] == 0.5 and report["citations"]["precision"] == 1.0
    assert report["escalation_rate"] == 0.5 and report["routes"] == {"slm": 1.0}
    assert report["confidence"]["auroc_f1_over_0_5"] == 1.0
    assert report["calibration"]["curve"][1]["f1"] is None  # Claude quality not measured
    assert report["ends"]["claude_only"] is None
    for key in ("retrieval", "answer", "citations", "escalation_rate", "routes", "cost"):
        assert key in report


def test_the_chart_leaves_out_what_was_not_measured_and_merges_shared_points():
    from hybrid_serve.benchmarks.quality import curve_points

    curve = [
        {
            "target_escalation": 0.0,
            "escalation_rate": 0.0,
            "cost_usd_per_question": 0.001,
            "f1": None,
            "f1_of_answers_kept_on_slm": 0.4,
        },
        {
            "target_escalation": 0.1,
            "escalation_rate": 0.0,
            "cost_usd_per_question": 0.001,
            "f1": None,
            "f1_of_answers_kept_on_slm": 0.4,
        },
        {
            "target_escalation": 0.5,
            "escalation_rate": 0.5,
            "cost_usd_per_question": 0.01,
            "f1": None,
            "f1_of_answers_kept_on_slm": 0.6,
        },
        {
            "target_escalation": 1.0,
            "escalation_rate": 1.0,
            "cost_usd_per_question": 0.02,
            "f1": None,
            "f1_of_answers_kept_on_slm": None,
        },
    ]
    assert curve_points(curve, claude_measured=False) == [(1.0, 0.4, "0%/10%"), (10.0, 0.6, "50%")]
    assert curve_points(curve, claude_measured=True) == []  # no F1 was measured at all


def test_risk_control_in_the_report_and_recalibrated_from_it(tmp_path):
    import json

    from hybrid_serve.cluster.cli import main

    run = {
        "outcomes": outcomes(with_claude=False),
        "ingest_docs_per_s": 30.0,
        "search_ms": [5.0, 7.0],
        "with_claude": False,
    }
    report = summarize(run, threshold=0.5, seed=0, files={}, alpha=0.3, delta=0.1)
    risk = report["risk_control"]
    # 20 answers is below any useful sample: the procedure says it cannot certify a threshold
    assert risk["n"] == 20 and not risk["feasible"] and len(report["questions"]) == 20
    questions = [
        {"dataset": "squad", "confidence": 0.5 + i / 400, "f1": 1.0 if i % 10 else 0.0}
        for i in range(200)
    ]  # one in ten wrong, whatever the confidence
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"questions": questions}))
    out = tmp_path / "cal"
    code = main(
        ["calibrate", "--report", str(path), "--alpha", "0.25", "--delta", "0.1", "--out", str(out)]
    )
    fitted = json.loads((out / "report.json").read_text())
    assert code == 0 and fitted["feasible"] and fitted["escalation_rate"] == 0.0
    assert fitted["bound"] <= 0.2 and (out / "risk_control.png").is_file()
    code = main(
        ["calibrate", "--report", str(path), "--alpha", "0.05", "--delta", "0.1", "--out", str(out)]
    )
    assert code == 1  # 10 % wrong cannot be bounded by 5 %


def test_routing_table_by_question_type_and_mode():
    def routed(text, doc, route):
        return {**answer(text, 0.5, doc), "route": route}

    out = []
    for i, kind in enumerate(["bridge", "bridge", "comparison"]):
        q = Question("hotpot", f"q{i}?", [f"ans{i}"], {f"d{i}", "x"}, kind)
        o = Outcome(q, slm=answer(f"ans{i} [1]", 0.5, f"d{i}"))
        o.modes = {
            "slm": o.slm,
            "decompose": routed("wrong [1]", "other", "decomposed"),
            "auto": routed(f"ans{i} [1]", f"d{i}", "decomposed" if i == 2 else "slm"),
        }
        out.append(o)
    rows = {(r["type"], r["mode"]): r for r in routing(out)}
    assert set(rows) == {
        (k, m) for k in ("bridge", "comparison") for m in ("slm", "decompose", "auto")
    }
    assert rows[("bridge", "slm")]["n"] == 2 and rows[("bridge", "slm")]["f1"] == 1.0
    assert rows[("bridge", "decompose")]["f1"] == 0.0
    assert rows[("bridge", "decompose")]["citation_precision"] == 0.0
    assert rows[("bridge", "slm")]["citation_recall"] == 0.5  # one of two gold passages cited
    assert rows[("comparison", "auto")]["decomposed"] == 1.0
    assert rows[("bridge", "auto")]["decomposed"] == 0.0
    assert "| hotpot | comparison | auto | 1 |" in "\n".join(routing_markdown(routing(out)))
