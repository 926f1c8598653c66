"""The answer cache on a replayed workload with repeats and paraphrases: hit rate, wrong hits,
and latency of hits against misses, measured in the same run.

The workload: `--unique` SQuAD questions (../shared/data), asked `--requests` times with
Zipf-distributed popularity (s = `--zipf`), as real traffic repeats its head. Each repeat is sent
as written, with different case and spacing, or as a paraphrase by rewrite rules that keep the
meaning (contractions, "How do/does" and "What is" variants, a polite prefix, dropped articles).
Besides, questions of the same paragraphs that are *different* questions are asked once each. A
hit is wrong when the answer it reuses was made for another question (`cached_question`).
Answers are the SLM's (`mode: slm`), so the cluster needs no Claude key.

    hybrid-serve up &   # or any cluster
    python -m hybrid_serve.benchmarks.cache --url http://127.0.0.1:8000 \\
        --squad ../shared/data/squad/squad-v1.1-dev-part-a.json
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path
from typing import Any

import httpx

from hybrid_serve.agents.semantic_cache import normalise
from hybrid_serve.benchmarks.confidence_signal import load_squad
from hybrid_serve.benchmarks.quality import ingest
from hybrid_serve.benchmarks.report import Progress, percentile, publish

RULES: list[tuple[str, str]] = [
    (r"^What is\b", "What's"),
    (r"^What's\b", "What is"),
    (r"^Who is\b", "Who's"),
    (r"^How do\b", "How does one"),
    (r"\bdid not\b", "didn't"),
    (r"\bdoes not\b", "doesn't"),
    (r"\bthe\b ", ""),
]


def paraphrase(question: str, rng: random.Random) -> str:
    """A rewording by rule; a polite prefix where no rule applies."""
    rules = [(p, r) for p, r in RULES if re.search(p, question)]
    if rules:
        pattern, repl = rng.choice(rules)
        return re.sub(pattern, repl, question, count=1)
    return "Tell me: " + question[0].lower() + question[1:]


def respell(question: str, rng: random.Random) -> str:
    out = question.lower() if rng.random() < 0.5 else question.upper()
    return "  ".join(out.rstrip("?").split(" ")) + ("" if rng.random() < 0.5 else "?")


def workload(
    squad: Path, unique: int, requests: int, zipf: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    docs, questions = load_squad(squad)
    rng = random.Random(seed)
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for i, q in enumerate(questions):
        by_doc.setdefault(q["doc_id"], []).append({**q, "qid": i})
    paragraphs = [qs for qs in by_doc.values() if len(qs) >= 2]
    rng.shuffle(paragraphs)
    head = [qs[0] for qs in paragraphs[:unique]]
    siblings = [qs[1] for qs in paragraphs[:unique]]  # same paragraph, another question
    weights = [1 / (rank + 1) ** zipf for rank in range(len(head))]
    seen: set[int] = set()
    stream = []
    for _ in range(requests):
        q = rng.choices(head, weights)[0]
        if q["qid"] not in seen:
            seen.add(q["qid"])
            text, kind = q["question"], "first"
        else:
            kind = rng.choice(["repeat", "respelled", "paraphrase"])
            text = {
                "repeat": q["question"],
                "respelled": respell(q["question"], rng),
                "paraphrase": paraphrase(q["question"], rng),
            }[kind]
        stream.append({"qid": q["qid"], "query": text, "kind": kind})
    # the different questions go in after their paragraph's first question was asked
    for s in siblings:
        stream.append({"qid": s["qid"], "query": s["question"], "kind": "different"})
    return docs, stream


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = Progress("cache")
    docs, stream = workload(args.squad, args.unique, args.requests, args.zipf, args.seed)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = []
    forms: dict[int, set[str]] = {}  # every way the workload asks each question
    for item in stream:
        forms.setdefault(item["qid"], set()).add(normalise(item["query"]))
    with httpx.Client(base_url=args.url, timeout=600, headers=headers) as client:
        if not args.no_ingest:
            ingest(client, docs, progress)
        for i, item in enumerate(stream):
            progress.step(i + 1, len(stream), "replaying")
            t0 = time.perf_counter()
            r = client.post("/v1/answer", json={"query": item["query"], "mode": "slm"})
            r.raise_for_status()
            body = r.json()
            latency_ms = (time.perf_counter() - t0) * 1000
            cache = r.headers.get("x-hybrid-serve-cache", body["cache"])
            # a hit is wrong when the answer it reuses was made for another question
            made_for = body.get("cached_question") or ""
            wrong = cache == "hit" and normalise(made_for) not in forms[item["qid"]]
            rows.append({**item, "cache": cache, "latency_ms": latency_ms, "wrong_hit": wrong})
    progress.done()
    return summarize(rows, args)


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def lat(sel: list[dict[str, Any]]) -> dict[str, float | None]:
        values = [r["latency_ms"] for r in sel]
        return {
            "n": len(values),
            "p50_ms": percentile(values, 50) if values else None,
            "p95_ms": percentile(values, 95) if values else None,
        }

    kinds = {}
    for kind in ("first", "repeat", "respelled", "paraphrase", "different"):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            kinds[kind] = {
                "requests": len(sel),
                "hit_rate": sum(r["cache"] == "hit" for r in sel) / len(sel),
            }
    hits = [r for r in rows if r["cache"] == "hit"]
    misses = [r for r in rows if r["cache"] == "miss"]
    p50_hit, p50_miss = lat(hits)["p50_ms"], lat(misses)["p50_ms"]
    return {
        "workload": {
            "unique": args.unique,
            "requests": len(rows),
            "zipf": args.zipf,
            "seed": args.seed,
        },
        "hit_rate": len(hits) / len(rows),
        "repeats_hit_rate": (
            sum(
                r["cache"] == "hit"
                for r in rows
                if r["kind"] in ("repeat", "respelled", "paraphrase")
            )
            / max(1, sum(r["kind"] in ("repeat", "respelled", "paraphrase") for r in rows))
        ),
        "wrong_hits": sum(r["wrong_hit"] for r in rows),
        "by_kind": kinds,
        "hits": lat(hits),
        "misses": lat(misses),
        "miss_over_hit_p50": (p50_miss / p50_hit) if p50_hit and p50_miss else None,
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [
        f"# Answer cache on a replayed workload ({w['requests']} requests, {w['unique']} "
        f"popular questions, Zipf s={w['zipf']})",
        "",
        f"Hit rate {report['hit_rate']:.3f} overall, {report['repeats_hit_rate']:.3f} of repeats; "
        f"wrong hits: {report['wrong_hits']}.",
        "",
        "| request kind | requests | hit rate |",
        "|---|---|---|",
    ]
    for kind, k in report["by_kind"].items():
        lines.append(f"| {kind} | {k['requests']} | {k['hit_rate']:.3f} |")
    h, m = report["hits"], report["misses"]
    lines += [
        "",
        "| | n | p50 ms | p95 ms |",
        "|---|---|---|---|",
        f"| hits | {h['n']} | {h['p50_ms'] or 0:.1f} | {h['p95_ms'] or 0:.1f} |",
        f"| misses | {m['n']} | {m['p50_ms'] or 0:.1f} | {m['p95_ms'] or 0:.1f} |",
    ]
    if report["miss_over_hit_p50"]:
        lines.append(f"\nA miss takes {report['miss_over_hit_p50']:.1f}× a hit at p50.")
    return "\n".join(lines)


def plot(report: dict[str, Any]):
    def draw(ax: Any) -> None:
        for cache, color in (("miss", "#c63"), ("hit", "#36a")):
            values = sorted(r["latency_ms"] for r in report["rows"] if r["cache"] == cache)
            if values:
                ax.plot(
                    values,
                    [i / len(values) for i in range(1, len(values) + 1)],
                    label=cache,
                    color=color,
                )
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (log)")
        ax.set_ylabel("share of requests")
        ax.set_title("Answer cache: latency of hits and misses")
        ax.legend()

    return draw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--squad", type=Path, required=True)
    ap.add_argument("--unique", type=int, default=40, help="popular questions")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key")
    ap.add_argument("--no-ingest", action="store_true", help="the corpus is already indexed")
    ap.add_argument("--out", default="bench-out/cache")
    args = ap.parse_args(argv)
    report = run(args)
    publish(Path(args.out), report, markdown(report), {"latency.png": plot(report)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
