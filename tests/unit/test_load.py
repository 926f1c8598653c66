"""The load generator's arrival process and the report's arithmetic (no server)."""

import random
import statistics

import pytest

from hybrid_serve.benchmarks.load import (
    BUNDLED_QUERIES,
    CostAssumptions,
    Result,
    RunSpec,
    capacity_plan,
    cost_check,
    load_queries,
    percentiles,
    poisson_arrivals,
    summarize,
)
from tests.conftest import SHARED


def test_poisson_arrivals_have_the_rate_and_the_spread_of_a_poisson_process():
    rate, duration = 20.0, 500.0
    t = poisson_arrivals(rate, duration, random.Random(1))
    assert abs(len(t) - rate * duration) < 3 * (rate * duration) ** 0.5  # 3 sigma
    assert t == sorted(t) and 0 <= t[0] and t[-1] < duration
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)
    counts = [0] * int(duration)
    for x in t:
        counts[int(x)] += 1
    # Poisson counts per second: variance equals the mean (index of dispersion 1).
    assert statistics.pvariance(counts) / statistics.mean(counts) == pytest.approx(1.0, abs=0.15)
    with pytest.raises(ValueError):
        poisson_arrivals(0, 1, random.Random(0))


def test_percentiles_interpolate_like_numpy():
    p = percentiles([10.0, 20.0, 30.0, 40.0])
    assert p == {"p50": 25.0, "p90": 37.0, "p95": 38.5, "p99": 39.7, "max": 40.0}
    assert percentiles([])["p95"] is None


def usage(cost: float, slm_tokens: int = 100) -> dict:
    return {
        "slm_prompt_tokens": slm_tokens,
        "slm_completion_tokens": 20,
        "claude_input_tokens": 1000 if cost else 0,
        "claude_output_tokens": 100 if cost else 0,
        "cost_usd": cost,
        "slm_cost_usd": 0.0001,
        "all_claude_cost_usd_estimate": 0.004,
    }


def test_summary_excludes_warmup_and_splits_routes_and_errors():
    spec = RunSpec(url="http://x", duration=10, rate=2.0, warmup=2)
    results = [
        Result(0.5, 9999.0, 200, None, "slm", usage(0)),  # warm-up: not counted
        *[Result(2 + i, 1000.0 + i, 200, None, "slm", usage(0)) for i in range(6)],
        Result(8.5, 3000.0, 200, None, "claude", usage(0.006)),
        Result(9.0, 50.0, 503),
        Result(9.5, 120000.0, "timeout"),
    ]
    s = summarize(results, spec, slo_p95_ms=5000, max_error_rate=0.5)
    assert s["requests"] == {"sent": 10, "counted": 9, "ok": 7}
    assert s["errors"] == {"503": 1, "timeout": 1} and s["rate_503"] == round(1 / 9, 4)
    assert s["routes"]["slm"]["share"] == round(6 / 7, 4)
    assert s["routes"]["claude"]["tokens"]["claude"] == 1100
    assert s["latency_ms"]["max"] == 3000.0 and s["slo"]["met"] is True
    assert s["throughput_rps"] == round(7 / 7.5, 3)  # counted window ends at the last arrival
    assert s["goodput_rps"] == s["throughput_rps"] and s["deadline_s"] == 60.0
    assert s["refusals"]["count"] == 1 and s["refusals"]["latency_ms"]["p50"] == 50.0
    strict = summarize(results, spec, slo_p95_ms=5000, max_error_rate=0.1)
    assert strict["slo"]["met"] is False


def test_goodput_counts_the_answers_inside_their_deadline():
    """An answer that arrived after its deadline (from its scheduled arrival) was received by
    nobody who waited for it: throughput counts it, goodput does not."""
    spec = RunSpec(url="http://x", duration=4, rate=2.0, warmup=0, deadline_s=2.0)
    results = [
        Result(0.0, 1500.0, 200, None, "slm", usage(0)),
        Result(1.0, 1999.0, 200, None, "slm", usage(0)),
        Result(2.0, 2500.0, 200, None, "slm", usage(0)),  # late
        Result(3.0, 12.0, 503),
        Result(4.0, 2001.0, 504),
    ]
    s = summarize(results, spec, slo_p95_ms=5000, max_error_rate=1.0)
    assert s["throughput_rps"] == 0.75 and s["goodput_rps"] == 0.5  # window: 4 s
    assert s["refusals"] == {"count": 1, "rate": 0.2, "latency_ms": s["refusals"]["latency_ms"]}
    assert s["deadline_s"] == 2.0


def test_a_mixed_run_reports_each_priority_class():
    spec = RunSpec(url="http://x", duration=4, rate=2.0, warmup=0, deadline_s=2.0, batch_share=0.5)
    results = [
        Result(0.0, 1500.0, 200, None, "slm", usage(0), priority="interactive"),
        Result(1.0, 1900.0, 200, None, "slm", usage(0), priority="interactive"),
        Result(2.0, 2500.0, 200, None, "slm", usage(0), priority="batch"),  # late
        Result(3.0, 12.0, 503, priority="batch"),
    ]
    s = summarize(results, spec, slo_p95_ms=5000, max_error_rate=1.0)  # a 3-s window
    interactive, batch = s["by_priority"]["interactive"], s["by_priority"]["batch"]
    assert interactive["goodput_rps"] == 0.667 and interactive["refusals"]["rate"] == 0.0
    assert batch["sent"] == 2 and batch["goodput_rps"] == 0.0 and batch["refusals"]["rate"] == 0.5
    unmixed = RunSpec(url="http://x", duration=4, rate=2.0, warmup=0)
    assert summarize(results, unmixed, 5000, 1.0)["by_priority"] is None


def test_the_cost_check_adds_up_one_replica_and_declines_with_more():
    """The answers' SLM cost against the replica's busy time at its price; with more than one
    SLM replica /readyz shows one of them, so no ratio is made (a wrong one is worse)."""
    results = [Result(i, 100.0, 200, None, "slm", {"slm_cost_usd": 0.001}) for i in range(3)]
    before = {"busy_seconds": 10.0, "charged_seconds": 10.0, "generations": 2}
    after = {"busy_seconds": 13.6, "charged_seconds": 13.6, "generations": 5}
    price = {"slm_gpu_hour_usd": 1.0, "replicas": 1}
    one = cost_check(results, {"before": {**before, **price}, "after": {**after, **price}})
    assert one is not None and one["checked"] and one["generations"] == 3
    assert one["answers_over_busy"] == pytest.approx(0.003 / (3.6 / 3600), rel=1e-3)
    two = {**price, "replicas": 2}
    many = cost_check(results, {"before": {**before, **two}, "after": {**after, **two}})
    assert many == {"checked": False, "why": many["why"]} and "2 SLM replicas" in many["why"]


def test_capacity_plan_arithmetic():
    run = {
        "throughput_rps": 2.0,
        "goodput_rps": 2.0,
        "slo": {"met": True},
        "routes": {"slm": {"share": 0.8}, "claude": {"share": 0.2}},
        "cost": {"claude_usd_per_request": 0.001, "all_claude_usd_per_request": 0.004},
    }
    a = CostAssumptions(
        target_rps=10, headroom=0.3, slm_replicas_measured=2, gpus_per_replica=1, gpu_hour_usd=3.6
    )
    plan = capacity_plan(run, a)
    assert plan["per_replica_rps_at_slo"] == 1.0
    assert plan["replicas"] == 13 and plan["gpus"] == 13  # ceil(10 x 1.3 / 1)
    c = plan["cost_per_1k_usd"]
    assert c["slm"] == pytest.approx(13 * 3.6 / 3600 / 10 * 1000)  # 1.3
    assert c["claude"] == 1.0 and c["all_claude"] == 4.0
    assert c["all_claude_over_hybrid"] == round(4.0 / 2.3, 2)
    assert plan["escalation_share"] == 0.2
    assert capacity_plan({**run, "slo": {"met": False}}, a)["feasible"] is False


def test_queries_file_is_validated(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text('{"query": "a?", "mode": "slm"}\n\n{"query": "b?"}\n')
    assert load_queries(str(good)) == [{"query": "a?", "mode": "slm"}, {"query": "b?"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_queries(str(bad))
    default = load_queries(None, limit=50)
    if (SHARED / "data/squad").is_dir():
        assert len(default) == 50  # the default mix from ../shared/data
    else:  # the bundled set, shuffled with the default seed as every mix is
        bundled = list(BUNDLED_QUERIES)
        random.Random(0).shuffle(bundled)
        assert [q["query"] for q in default] == bundled[:50]
