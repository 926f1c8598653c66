"""Quality evaluation and escalation-threshold calibration, the way RouteLLM and ALCE measure.

    hybrid-serve bench quality [--squad FILE] [--hotpot FILE] [--limit N] [--seed S] [--url URL]
                               --out DIR

The corpus is built from the files themselves (SQuAD: one document per paragraph, titled by its
article; HotpotQA: every paragraph of the selected questions) and ingested into a fresh index of a
cluster this command starts (or, with --url, into the running one, beside what it holds). Then:

- retrieval: recall@1/5/10 of the gold paragraph (SQuAD) or of both gold paragraphs (HotpotQA,
  the share of the two found), from `/v1/search`, on `--retrieval-limit` questions;
- answers: `/v1/answer` with `mode: slm` on `--limit` questions — exact match and token F1 with
  SQuAD's normalisation; citation precision and recall in the ALCE sense, where a citation is right
  when its passage is a gold passage (precision: right citations / citations; recall: gold
  passages cited / gold passages); the SLM's confidence, its AUROC for "the answer is right"
  (F1 > 0.5), cost, the all-Claude estimate and latency;
- when Claude is usable (a key in the cluster), the same questions with `mode: claude` (the
  Claude-only end) and `mode: auto` (the real route mix). Without it, Claude-side quality is not
  measured and the report says so; escalation is then what the configured threshold would send;
- calibration: for each target escalation fraction, the confidence threshold that meets it on a
  calibration split, and quality and cost on the held-out split — escalated questions take the
  Claude-only answer when measured — as a cost-quality curve.

Rates are fractions in 0-1. Writes report.json, report.md, cost_quality.png and
retrieval_recall.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hybrid_serve.agents.calibration import risk_threshold
from hybrid_serve.agents.shadow import kept_error_rate, read_verdicts
from hybrid_serve.benchmarks.confidence_signal import load_squad
from hybrid_serve.benchmarks.report import NO_CACHE, Progress, percentile, publish
from hybrid_serve.benchmarks.scoring import (
    auroc,
    exact_match,
    f1_score,
    recall_at_k,
    strip_citations,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGETS = (0.1, 0.2, 0.3)
# Each acknowledged write is a new index segment, durable before it is acknowledged: few large
# batches ingest fastest.
BATCH_DOCS = 512
BATCH_BYTES = 1_000_000


@dataclass
class Question:
    dataset: str
    question: str
    answers: list[str]
    gold: set[str]  # doc ids of the gold paragraphs
    kind: str = "single-hop"  # HotpotQA's own type: bridge, comparison


@dataclass
class Outcome:
    q: Question
    ranking: list[str] = field(default_factory=list)
    slm: dict[str, Any] | None = None
    claude: dict[str, Any] | None = None
    auto: dict[str, Any] | None = None
    # the answers in each of --modes (the routing table)
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def answered(self) -> dict[str, Any]:
        """The SLM's answer, for an outcome known to have one."""
        if self.slm is None:
            raise ValueError(f"{self.q.question!r} has no SLM answer")
        return self.slm


# -- datasets -------------------------------------------------------------------------------------


def squad(path: Path) -> tuple[list[dict[str, Any]], list[Question]]:
    docs, rows = load_squad(path)
    return docs, [Question("squad", q["question"], q["answers"], {q["doc_id"]}) for q in rows]


def hotpot(path: Path, limit: int | None, seed: int) -> tuple[list[dict[str, Any]], list[Question]]:
    rows = json.loads(path.read_text())
    rows = sample(rows, limit, seed)
    docs: dict[str, dict[str, Any]] = {}
    questions = []
    for row in rows:
        ctx = row["context"]
        for title, sentences in zip(ctx["title"], ctx["sentences"]):
            doc_id = f"hotpot:{title}"
            docs[doc_id] = {"id": doc_id, "title": title, "text": "".join(sentences)}
        gold = {f"hotpot:{t}" for t in row["supporting_facts"]["title"]}
        kind = row.get("type", "multi-hop")
        questions.append(Question("hotpot", row["question"], [row["answer"]], gold, kind))
    return list(docs.values()), questions


def sample(rows: list[Any], limit: int | None, seed: int) -> list[Any]:
    if limit is None or limit >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, limit)


# -- metrics --------------------------------------------------------------------------------------


def citation_scores(citations: list[dict[str, Any]], gold: set[str]) -> tuple[int, int, int]:
    """(right citations, citations, gold passages cited) for one answer."""
    cited = [c["doc_id"] for c in citations]
    return sum(d in gold for d in cited), len(cited), len(gold.intersection(cited))


def answer_of(o: Outcome, side: str) -> dict[str, Any] | None:
    """The answer in mode `side`: asked for --modes, or as a side of the calibration."""
    if side in o.modes:
        return o.modes[side]
    return getattr(o, side) if side in ("slm", "claude", "auto") else None


def answer_metrics(outcomes: list[Outcome], side: str) -> dict[str, Any]:
    rows = [(o.q, r) for o in outcomes if (r := answer_of(o, side)) is not None]
    if not rows:
        return {}
    em = [exact_match(strip_citations(r["answer"]), q.answers) for q, r in rows]
    f1 = [f1_score(strip_citations(r["answer"]), q.answers) for q, r in rows]
    right = total = gold_cited = gold = 0
    for q, r in rows:
        a, b, c = citation_scores(r["citations"], q.gold)
        right, total, gold_cited, gold = right + a, total + b, gold_cited + c, gold + len(q.gold)
    latency = [r["_latency_ms"] for _, r in rows]
    return {
        "n": len(rows),
        "exact_match": round(statistics.mean(em), 4),
        "f1": round(statistics.mean(f1), 4),
        "citations": {
            "precision": round(right / total, 4) if total else 0.0,
            "recall": round(gold_cited / gold, 4) if gold else 0.0,
            "per_answer": round(total / len(rows), 2),
        },
        "cost_usd_per_question": round(
            statistics.mean(r["usage"]["cost_usd"] + r["usage"]["slm_cost_usd"] for _, r in rows), 8
        ),
        "all_claude_cost_usd_estimate": round(
            statistics.mean(r["usage"]["all_claude_cost_usd_estimate"] for _, r in rows), 8
        ),
        "latency_ms": {
            "p50": round(percentile(latency, 50), 1),
            "p90": round(percentile(latency, 90), 1),
        },
    }


def threshold_for(confidences: list[float], fraction: float) -> float:
    """The threshold below which `fraction` of these confidences fall (escalate)."""
    if not confidences:
        return 0.0
    xs = sorted(confidences)
    k = round(fraction * len(xs))
    if k <= 0:
        return xs[0]  # nothing below the lowest
    if k >= len(xs):
        return xs[-1] + 1e-9
    return (xs[k - 1] + xs[k]) / 2


def calibrate(outcomes: list[Outcome], seed: int) -> dict[str, Any]:
    """Thresholds fitted on half the answered questions, judged on the other half."""
    answered = [o for o in outcomes if o.slm is not None]
    rng = random.Random(seed)
    order = list(answered)
    rng.shuffle(order)
    half = len(order) // 2
    fit, held = order[:half], order[half:]
    claude_measured = all(o.claude is not None for o in answered) and bool(answered)

    def f1_of(o: Outcome, r: dict[str, Any]) -> float:
        return f1_score(strip_citations(r["answer"]), o.q.answers)

    def point(threshold: float) -> dict[str, Any]:
        f1s, costs, kept = [], [], []
        for o in held:
            escalate = o.answered["confidence"] < threshold
            if escalate and claude_measured and (r := o.claude) is not None:
                f1s.append(f1_of(o, r))
                costs.append(o.answered["usage"]["slm_cost_usd"] + r["usage"]["cost_usd"])
            elif escalate:  # Claude not measured: its cost estimated, its quality unknown
                costs.append(
                    o.answered["usage"]["slm_cost_usd"]
                    + o.answered["usage"]["all_claude_cost_usd_estimate"]
                )
            else:
                f1s.append(f1_of(o, o.answered))
                kept.append(f1_of(o, o.answered))
                costs.append(o.answered["usage"]["slm_cost_usd"])
        n = len(held) or 1
        return {
            "threshold": round(threshold, 4),
            "escalation_rate": round(
                sum(o.answered["confidence"] < threshold for o in held) / n, 4
            ),
            "f1": round(statistics.mean(f1s), 4) if claude_measured and f1s else None,
            "f1_of_answers_kept_on_slm": round(statistics.mean(kept), 4) if kept else None,
            "cost_usd_per_question": round(sum(costs) / n, 8),
        }

    curve = []
    for target in (0.0, *TARGETS, 1.0):
        t = threshold_for([o.answered["confidence"] for o in fit], target)
        curve.append({"target_escalation": target, **point(t)})
    return {
        "calibration_questions": len(fit),
        "held_out_questions": len(held),
        "claude_quality_measured": claude_measured,
        "curve": curve,
    }


# -- running ---------------------------------------------------------------------------------------


def ingest(client: httpx.Client, docs: list[dict[str, Any]], progress: Progress) -> float:
    """Documents per second, acknowledged (durable) by the cluster."""
    t0 = time.perf_counter()
    done = 0
    batch: list[dict[str, Any]] = []
    size = 0
    for i, doc in enumerate(docs):
        batch.append(doc)
        size += len(json.dumps(doc))
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES or i == len(docs) - 1:
            r = client.post("/v1/documents", json={"documents": batch})
            if r.status_code != 201:
                raise RuntimeError(f"ingestion failed: {r.status_code} {r.text[:300]}")
            done += len(batch)
            progress.step(done, len(docs), "ingesting paragraphs")
            batch, size = [], 0
    return len(docs) / (time.perf_counter() - t0)


def ask(client: httpx.Client, question: str, mode: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = client.post("/v1/answer", json={"query": question, "mode": mode, "verify": "never"})
    r.raise_for_status()
    body = r.json()
    body["_latency_ms"] = (time.perf_counter() - t0) * 1000
    return body


def claude_usable(client: httpx.Client) -> bool:
    claude = client.get("/readyz").json().get("components", {}).get("claude", {})
    return bool(claude.get("available"))


def evaluate(
    url: str,
    datasets: list[tuple[list[dict[str, Any]], list[Question]]],
    limit: int | None,
    retrieval_limit: int | None,
    seed: int,
    api_key: str | None,
    progress: Progress,
    modes: tuple[str, ...] = (),
) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=600, headers={**headers, **NO_CACHE}) as client:
        docs = [d for ds, _ in datasets for d in ds]
        rate = ingest(client, docs, progress)
        with_claude = claude_usable(client)
        outcomes: list[Outcome] = []
        search_ms: list[float] = []
        for _, questions in datasets:
            picked = sample(questions, retrieval_limit, seed)
            for i, q in enumerate(picked):
                progress.step(i + 1, len(picked), f"retrieval ({q.dataset})")
                t0 = time.perf_counter()
                r = client.post("/v1/search", json={"query": q.question, "top_k": 10})
                r.raise_for_status()
                search_ms.append((time.perf_counter() - t0) * 1000)
                ranking = list(dict.fromkeys(p["doc_id"] for p in r.json()["passages"]))
                outcomes.append(Outcome(q, ranking))
        by_dataset: dict[str, list[Outcome]] = {}
        for o in outcomes:
            by_dataset.setdefault(o.q.dataset, []).append(o)
        for name, group in by_dataset.items():
            answered = sample(group, limit, seed)
            for i, o in enumerate(answered):
                progress.step(i + 1, len(answered), f"answers ({name})")
                o.slm = ask(client, o.q.question, "slm")
                if with_claude:
                    o.claude = ask(client, o.q.question, "claude")
                    o.auto = ask(client, o.q.question, "auto")
                for mode in dict.fromkeys(("slm", *modes)) if modes else ():
                    done = {"slm": o.slm, "claude": o.claude, "auto": o.auto}.get(mode)
                    o.modes[mode] = done or ask(client, o.q.question, mode)
    return {
        "outcomes": outcomes,
        "ingest_docs_per_s": rate,
        "search_ms": search_ms,
        "with_claude": with_claude,
    }


def risk_control(
    confidences: list[float], right: list[bool], alpha: float, delta: float
) -> dict[str, Any]:
    """The threshold that bounds the error rate of SLM-kept answers (F1 ≤ 0.5 is an error) at
    α with confidence 1 − δ (agents/calibration.py), and the escalation that costs."""
    if not confidences:
        return {"alpha": alpha, "delta": delta, "n": 0, "feasible": False, "steps": []}
    return risk_threshold(confidences, [not r for r in right], alpha, delta).to_dict()


def summarize(
    run: dict[str, Any],
    threshold: float,
    seed: int,
    files: dict[str, str],
    alpha: float = 0.2,
    delta: float = 0.1,
) -> dict[str, Any]:
    outcomes: list[Outcome] = run["outcomes"]

    def retrieval(group: list[Outcome]) -> dict[str, Any]:
        return {
            f"recall_at_{k}": round(
                statistics.mean(recall_at_k(o.ranking, o.q.gold, k) for o in group), 4
            )
            for k in (1, 5, 10)
        } | {"n": len(group)}

    answered = [o for o in outcomes if o.slm is not None]
    slm = answer_metrics(outcomes, "slm")
    confidences = [o.answered["confidence"] for o in answered]
    right = [f1_score(strip_citations(o.answered["answer"]), o.q.answers) > 0.5 for o in answered]
    if run["with_claude"]:
        auto = [o.auto for o in answered if o.auto is not None]
        routes: dict[str, float] = {}
        for r in auto:
            routes[r["route"]] = routes.get(r["route"], 0) + 1 / len(auto)
        escalation = sum(r["escalation"]["escalated"] for r in auto) / len(auto) if auto else 0.0
    else:  # without Claude every answer stays on the SLM; say what the threshold would send
        routes = {"slm": 1.0} if answered else {}
        escalation = (
            sum(c < threshold for c in confidences) / len(confidences) if confidences else 0
        )
    datasets = {}
    for name in sorted({o.q.dataset for o in outcomes}):
        group = [o for o in outcomes if o.q.dataset == name]
        datasets[name] = {
            "retrieval": retrieval(group),
            "slm": answer_metrics(group, "slm"),
            "claude": answer_metrics(group, "claude") or None,
        }
    return {
        "files": files,
        "seed": seed,
        "threshold": threshold,
        "claude_measured": run["with_claude"],
        "retrieval": retrieval(outcomes),
        "answer": {"exact_match": slm.get("exact_match", 0.0), "f1": slm.get("f1", 0.0)},
        "citations": {
            "precision": slm.get("citations", {}).get("precision", 0.0),
            "recall": slm.get("citations", {}).get("recall", 0.0),
        },
        "escalation_rate": round(escalation, 4),
        "routes": {k: round(v, 4) for k, v in routes.items()},
        "cost": {
            "slm_only_usd_per_question": slm.get("cost_usd_per_question", 0.0),
            "all_claude_usd_per_question_estimate": slm.get("all_claude_cost_usd_estimate", 0.0),
            "claude_only_usd_per_question": (answer_metrics(outcomes, "claude") or {}).get(
                "cost_usd_per_question"
            ),
        },
        "confidence": {
            "auroc_f1_over_0_5": auroc(confidences, right),
            "positives": sum(right),
            "negatives": len(right) - sum(right),
        },
        "latency": {
            "answer_ms": slm.get("latency_ms", {}),
            "search_ms_p50": round(percentile(run["search_ms"], 50), 2),
            "search_ms_p90": round(percentile(run["search_ms"], 90), 2),
            "ingest_paragraphs_per_s": round(run["ingest_docs_per_s"], 2),
        },
        "ends": {
            "slm_only": slm or None,
            "claude_only": answer_metrics(outcomes, "claude") or None,
        },
        "calibration": calibrate(outcomes, seed),
        "routing": routing(outcomes),
        "risk_control": risk_control(confidences, right, alpha, delta),
        "datasets": datasets,
        # what `hybrid-serve calibrate --report` re-fits from, without asking again
        "questions": [
            {
                "dataset": o.q.dataset,
                "confidence": o.answered["confidence"],
                "f1": round(f1_score(strip_citations(o.answered["answer"]), o.q.answers), 4),
            }
            for o in answered
        ],
    }


def routing(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Answer quality per question type and mode (--modes): what the `auto` policy is set from.
    For `auto`, also the share of questions it decomposed."""
    answered = [o for o in outcomes if o.modes]
    rows = []
    kinds = sorted({(o.q.dataset, o.q.kind) for o in answered})
    modes = list(dict.fromkeys(m for o in answered for m in o.modes))
    for dataset, kind in kinds:
        group = [o for o in answered if (o.q.dataset, o.q.kind) == (dataset, kind)]
        for mode in modes:
            m = answer_metrics(group, mode)
            if not m:
                continue
            answers = [o.modes[mode] for o in group if mode in o.modes]
            rows.append(
                {
                    "dataset": dataset,
                    "type": kind,
                    "mode": mode,
                    "n": m["n"],
                    "f1": m["f1"],
                    "exact_match": m["exact_match"],
                    "citation_precision": m["citations"]["precision"],
                    "citation_recall": m["citations"]["recall"],
                    "latency_ms_p50": m["latency_ms"]["p50"],
                    "decomposed": round(
                        sum(a["route"] == "decomposed" for a in answers) / len(answers), 4
                    ),
                }
            )
    return rows


def routing_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Routing: answer quality by question type and mode",
        "",
        "Each question is asked in every mode, `slm` first (latency is in report.json, not here: "
        "later modes reuse the SLM's cached prompt prefix).",
        "",
        "| data | type | mode | n | F1 | EM | citation P / R | decomposed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['type']} | {r['mode']} | {r['n']} | {r['f1']:.3f} | "
            f"{r['exact_match']:.3f} | {r['citation_precision']:.3f} / {r['citation_recall']:.3f}"
            f" | {r['decomposed']:.0%} |"
        )
    return ["", *lines]


def routing_plot(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        groups = list(dict.fromkeys(f"{r['dataset']}\n{r['type']}" for r in rows))
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        width = 0.8 / max(1, len(modes))
        for j, mode in enumerate(modes):
            f1 = {f"{r['dataset']}\n{r['type']}": r["f1"] for r in rows if r["mode"] == mode}
            xs = [i + j * width for i in range(len(groups))]
            ax.bar(xs, [f1.get(g, 0.0) for g in groups], width, label=f"mode {mode}")
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel("answer F1")
        ax.set_title("Answer F1 by question type and mode")
        ax.legend(fontsize=7)

    return draw


def markdown(report: dict[str, Any]) -> str:
    r, a, c = report["retrieval"], report["answer"], report["citations"]
    lines = [
        "# Quality",
        "",
        f"Files: {', '.join(f'{k}: `{v}`' for k, v in report['files'].items())}; seed "
        f"{report['seed']}; escalation threshold {report['threshold']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| retrieval recall@1 / @5 / @10 ({r['n']} questions) | {r['recall_at_1']:.3f} / "
        f"{r['recall_at_5']:.3f} / {r['recall_at_10']:.3f} |",
        f"| SLM exact match / F1 | {a['exact_match']:.3f} / {a['f1']:.3f} |",
        f"| citation precision / recall (gold passage) | {c['precision']:.3f} / "
        f"{c['recall']:.3f} |",
        f"| escalation rate | {report['escalation_rate']:.1%} |",
        f"| confidence AUROC for F1 > 0.5 | {report['confidence']['auroc_f1_over_0_5']} "
        f"({report['confidence']['positives']} right, {report['confidence']['negatives']} not) |",
        f"| search p50 / ingestion | {report['latency']['search_ms_p50']} ms / "
        f"{report['latency']['ingest_paragraphs_per_s']} paragraphs/s |",
        f"| cost per question: SLM only / all-Claude estimate | "
        f"${report['cost']['slm_only_usd_per_question']:.6f} / "
        f"${report['cost']['all_claude_usd_per_question_estimate']:.6f} |",
    ]
    for name, d in report["datasets"].items():
        rr = d["retrieval"]
        lines.append(
            f"| {name}: recall@1/5/10, F1 | {rr['recall_at_1']:.3f} / {rr['recall_at_5']:.3f} / "
            f"{rr['recall_at_10']:.3f}, {d['slm'].get('f1', 0):.3f} |"
        )
    cal = report["calibration"]
    lines += [
        "",
        f"## Calibration ({cal['calibration_questions']} to fit, {cal['held_out_questions']} "
        "held out)",
        "",
        "| target | threshold | held-out escalation | F1 | F1 of SLM-kept | $/question |",
        "|---|---|---|---|---|---|",
    ]
    for p in cal["curve"]:
        f1 = "not measured" if p["f1"] is None else f"{p['f1']:.3f}"
        kept = (
            "-"
            if p["f1_of_answers_kept_on_slm"] is None
            else f"{p['f1_of_answers_kept_on_slm']:.3f}"
        )
        lines.append(
            f"| {p['target_escalation']:.0%} | {p['threshold']} | {p['escalation_rate']:.1%} | "
            f"{f1} | {kept} | {p['cost_usd_per_question']:.6f} |"
        )
    lines += ["", *risk_markdown(report["risk_control"])]
    lines += routing_markdown(report.get("routing", []))
    if not report["claude_measured"]:
        lines += [
            "",
            "Claude was not reachable, so Claude-side quality is not measured: escalated "
            "questions count at the all-Claude cost estimate and F1 is given for the answers "
            "kept on the SLM. With a key in the cluster the same command measures both ends.",
        ]
    return "\n".join(lines)


def risk_markdown(risk: dict[str, Any]) -> list[str]:
    head = (
        f"## Risk control: error rate of SLM-kept answers ≤ {risk['alpha']:.0%} with "
        f"confidence {1 - risk['delta']:.0%} ({risk['n']} answers)"
    )
    if not risk.get("feasible"):
        return [
            head,
            "",
            "No threshold can be certified on this sample: escalate everything, "
            "or calibrate on more questions.",
        ]
    return [
        head,
        "",
        f"Threshold **{risk['threshold']:.4f}**: {risk['kept']} answers kept, {risk['errors']} "
        f"wrong, upper bound {risk['bound']:.3f}; escalation rate {risk['escalation_rate']:.1%}. "
        "Set it with `escalation.threshold` (or `hybrid-serve calibrate`).",
    ]


def risk_plot(risk: dict[str, Any]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        steps = risk.get("steps", [])
        if steps:
            xs = [s["threshold"] for s in steps]
            ax.plot(xs, [s["bound"] for s in steps], "o-", ms=3, label="upper bound on error")
            ax.plot(xs, [s["escalation_rate"] for s in steps], "s-", ms=3, label="escalation")
        ax.axhline(risk["alpha"], color="red", ls="--", lw=1, label=f"α = {risk['alpha']}")
        if risk.get("feasible"):
            ax.axvline(risk["threshold"], color="gray", ls=":", lw=1, label="chosen threshold")
        ax.set_xlabel("confidence threshold (tested from strict to lenient)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Risk control (δ = {risk['delta']})")
        ax.legend(fontsize=7)

    return draw


def curve_points(
    curve: list[dict[str, Any]], claude_measured: bool
) -> list[tuple[float, float, str]]:
    """The cost-quality points to plot: (USD per 1,000 questions, F1, escalation targets). A
    point whose quality was not measured (escalated answers when Claude was not) is left out,
    not drawn at 0; targets that land on the same point share one label."""
    merged: dict[tuple[float, float], list[str]] = {}
    for p in curve:
        f1 = p["f1"] if claude_measured else p["f1_of_answers_kept_on_slm"]
        if f1 is None or (not claude_measured and p["escalation_rate"] >= 1.0):
            continue
        xy = (p["cost_usd_per_question"] * 1000, f1)
        merged.setdefault(xy, []).append(f"{p['target_escalation']:.0%}")
    return [(x, y, "/".join(labels)) for (x, y), labels in sorted(merged.items())]


def plots(report: dict[str, Any]) -> dict[str, Any]:
    curve = report["calibration"]["curve"]

    def cost_quality(ax: Any) -> None:
        points = curve_points(curve, report["claude_measured"])
        if report["claude_measured"]:
            label = "F1 (held out)"
        else:
            label = "F1 of answers kept on the SLM (Claude not measured)"
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="hybrid")
        for i, (x, y, text) in enumerate(points):
            # alternate above and below the line so neighbouring labels do not overlap
            ax.annotate(
                text,
                (x, y),
                xytext=(4, 6 if i % 2 == 0 else -11),
                textcoords="offset points",
                fontsize=7,
            )
        ends = report["ends"]
        if ends["slm_only"]:
            ax.scatter(
                [ends["slm_only"]["cost_usd_per_question"] * 1000],
                [ends["slm_only"]["f1"]],
                marker="s",
                color="green",
                zorder=3,
                label="SLM only",
            )
        if ends["claude_only"]:
            ax.scatter(
                [ends["claude_only"]["cost_usd_per_question"] * 1000],
                [ends["claude_only"]["f1"]],
                marker="*",
                s=120,
                color="red",
                zorder=3,
                label="Claude only",
            )
        ax.set_xlabel("USD per 1,000 questions")
        ax.set_ylabel(label)
        ax.set_title("Cost-quality curve")
        ax.legend(fontsize=7)

    def recall(ax: Any) -> None:
        names = list(report["datasets"])
        ks = (1, 5, 10)
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            rr = report["datasets"][name]["retrieval"]
            ax.bar(
                [k + i * width for k in range(3)],
                [rr[f"recall_at_{k}"] for k in ks],
                width,
                label=name,
            )
        ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(3)], [f"@{k}" for k in ks])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("recall")
        ax.set_title("Retrieval recall")
        ax.legend(fontsize=8)

    return {
        "cost_quality.png": cost_quality,
        "retrieval_recall.png": recall,
        "risk_control.png": risk_plot(report["risk_control"]),
    } | ({"routing.png": routing_plot(report["routing"])} if report.get("routing") else {})


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--squad", help="SQuAD-format JSON")
    ap.add_argument("--hotpot", help="HotpotQA JSON in the layout of ../shared/data/hotpotqa")
    ap.add_argument("--limit", type=int, help="questions answered per file (default: all)")
    ap.add_argument(
        "--retrieval-limit", type=int, help="questions for retrieval metrics (default: all)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", help="a running cluster (default: start one with a fresh index)")
    ap.add_argument("--api-key", help="bearer key (default: $HYBRID_SERVE_API_KEY)")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--modes",
        default="",
        help="also answer each question in these modes (comma-separated: decompose, auto, "
        "claude) for the routing table by question type",
    )
    add_risk_arguments(ap)


def add_risk_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--alpha", type=float, default=0.2, help="target error rate of SLM-kept answers"
    )
    ap.add_argument("--delta", type=float, default=0.1, help="allowed chance of missing it")


def recalibrate(args: argparse.Namespace) -> dict[str, Any]:
    """`hybrid-serve calibrate`: the risk-controlled threshold from a quality report's answers
    (`--report`), or from production's shadow verdicts (`--from-log`)."""
    if args.from_log:
        return recalibrate_from_log([Path(p) for p in args.from_log], args)
    data = json.loads(Path(args.report).read_text())
    questions = data.get("questions")
    if not questions:
        raise ValueError(f"{args.report} has no per-question answers: run bench quality again")
    risk = risk_control(
        [q["confidence"] for q in questions],
        [q["f1"] > 0.5 for q in questions],
        args.alpha,
        args.delta,
    )
    _publish_risk(risk_markdown(risk), risk, args)
    return risk


def recalibrate_from_log(paths: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """The same from Claude's shadow verdicts. They exist only for answers that were kept, so
    only thresholds at or above the one in force then can be certified; escalation is counted
    among those answers."""
    verdicts = read_verdicts(paths)
    if not verdicts:
        raise ValueError(
            "no shadow verdicts in " + ", ".join(map(str, paths)) + ": set "
            "escalation.shadow_verify_share and let the cluster answer for a while"
        )
    rate = kept_error_rate(verdicts)
    wrong = [v.wrong for v in verdicts]
    risk = risk_threshold([v.confidence for v in verdicts], wrong, args.alpha, args.delta).to_dict()
    risk["observed"] = {
        **vars(rate),
        "thresholds_in_force": sorted({v.threshold for v in verdicts}),
    }
    lines = [
        f"Kept answers graded by Claude: {rate.verdicts}, {rate.wrong} wrong: error rate "
        f"{rate.rate:.1%} (95 % interval {rate.lower:.1%}–{rate.upper:.1%}) at threshold(s) "
        + ", ".join(f"{t:g}" for t in risk["observed"]["thresholds_in_force"])
        + ". Escalation below is the share of these kept answers a new threshold would send on.",
        "",
        *risk_markdown(risk),
    ]
    _publish_risk(lines, risk, args)
    return risk


def _publish_risk(lines: list[str], risk: dict[str, Any], args: argparse.Namespace) -> None:
    if risk.get("feasible"):
        lines += ["", "```yaml", "escalation:", f"  threshold: {risk['threshold']:.4f}", "```"]
    publish(Path(args.out), risk, "\n".join(lines), {"risk_control.png": risk_plot(risk)})


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hybrid_serve.config import HybridServeConfig

    if not args.squad and not args.hotpot:
        raise ValueError("give --squad FILE and/or --hotpot FILE")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = set(modes) - {"slm", "decompose", "auto", "claude"}
    if unknown:
        raise ValueError(f"unknown --modes: {', '.join(sorted(unknown))}")
    datasets = []
    files = {}
    if args.squad:
        datasets.append(squad(Path(args.squad)))
        files["squad"] = args.squad
    if args.hotpot:
        datasets.append(hotpot(Path(args.hotpot), args.limit, args.seed))
        files["hotpot"] = args.hotpot
    progress = Progress("quality")
    api_key = args.api_key or os.environ.get("HYBRID_SERVE_API_KEY")
    started: tuple[HybridServeConfig, Any] | None = None
    url = args.url
    if url is None:
        from hybrid_serve.cluster import local

        cfg = HybridServeConfig.load(
            overrides={
                "data_dir": tempfile.mkdtemp(prefix="hs-quality-"),
                "http.port": local.free_port(),
                "retriever.index_sample_corpus": False,
            }
        )
        progress.say("starting a cluster with a fresh index")
        target = local.init_ray(cfg, new_cluster=True)
        url = local.deploy(cfg, on_status=progress.say)
        started = (cfg, target)
        threshold = cfg.escalation.threshold
    else:
        threshold = HybridServeConfig.load().escalation.threshold
    try:
        result = evaluate(
            url, datasets, args.limit, args.retrieval_limit, args.seed, api_key, progress, modes
        )
    finally:
        if started is not None:
            local.shutdown(*started)
    progress.done()
    report = summarize(result, threshold, args.seed, files, args.alpha, args.delta)
    publish(Path(args.out), report, markdown(report), plots(report))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
