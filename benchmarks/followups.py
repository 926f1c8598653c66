"""Follow-up questions: retrieval recall of a conversation's second turn, searched as asked, with
the previous user question, and as the SLM's self-contained rewrite (conversation.follow_ups).

The conversations are built from SQuAD (../shared/data): for a question that names its article's
subject ("... the Normans ..."), the first turn is another question of the same article that names
it too, with its gold answer as the assistant's reply; the second turn is the question with the
subject replaced by "it" / "they", so that only the conversation says what it is about. A turn is
found when its gold paragraph is in the top k.

    python -m hybrid_serve.benchmarks.followups \
        --squad ../shared/data/squad/squad-v1.1-dev-part-a.json
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
from pathlib import Path
from typing import Any

from hybrid_serve.agents.pipeline import Pipeline
from hybrid_serve.benchmarks.confidence_signal import load_squad, squad_index
from hybrid_serve.benchmarks.report import Progress, publish
from hybrid_serve.config import HybridServeConfig

MODES = ("off", "previous", "condense")


def conversations(squad: Path, limit: int, seed: int) -> tuple[list[dict[str, Any]], list[dict]]:
    docs, questions = load_squad(squad)
    title_of = {d["id"]: d["title"] for d in docs}
    by_article: dict[str, list[dict[str, Any]]] = {}
    for q in questions:
        by_article.setdefault(title_of[q["doc_id"]], []).append(q)
    rng = random.Random(seed)
    out = []
    for title, qs in by_article.items():
        subject = re.compile(r"\b(?:the )?" + re.escape(title) + r"\b", re.I)
        naming = [q for q in qs if subject.search(q["question"])]
        rng.shuffle(naming)
        pronoun = "they" if title.lower().endswith("s") else "it"
        for first, second in zip(naming[::2], naming[1::2]):
            follow = subject.sub(pronoun, second["question"], count=1)
            out.append(
                {
                    "history": [
                        {"role": "user", "content": first["question"]},
                        {"role": "assistant", "content": first["answers"][0]},
                    ],
                    "question": follow[0].upper() + follow[1:],
                    "gold": second["doc_id"],
                    "original": second["question"],
                }
            )
    rng.shuffle(out)
    return docs, out[:limit]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.engines.llama_cpp import LlamaCppEngine

    progress = Progress("followups")
    docs, convs = conversations(args.squad, args.limit, args.seed)
    store = squad_index(docs, progress)
    engine = LlamaCppEngine(bundled_gguf(), n_threads=args.threads)

    async def retrieve(query: str, top_k: int, collections=None):
        return store.search(query, top_k)

    rows: list[dict[str, Any]] = [dict(c) for c in convs]

    async def measure() -> None:
        for mode in MODES:
            mcfg = HybridServeConfig.load(overrides={"conversation.follow_ups": mode})
            pipe = Pipeline(retrieve, engine.generate, mcfg)
            for i, row in enumerate(rows):
                progress.step(i + 1, len(rows), f"{mode}")
                query = (
                    await pipe.followup_query(row["question"], row["history"]) or row["question"]
                )
                hits = store.search(query, args.k)
                row[mode] = {"query": query, "found": row["gold"] in {p.doc_id for p in hits}}
            for row in rows:
                hits = store.search(row["original"], args.k)
                row["as_written"] = row["gold"] in {p.doc_id for p in hits}

    asyncio.run(measure())
    progress.done()
    n = len(rows)
    recall = {m: sum(r[m]["found"] for r in rows) / n for m in MODES}
    recall["original_question"] = sum(r["as_written"] for r in rows) / n
    fell_back = sum(
        r["condense"]["query"] == f"{r['history'][0]['content'].strip()} {r['question']}"
        for r in rows
    )
    return {
        "conversations": n,
        "k": args.k,
        "recall_at_k": recall,
        "condense_fell_back": fell_back,
        "examples": rows[:8],
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    r = report["recall_at_k"]
    k = report["k"]
    lines = [
        f"# Follow-up questions: recall@{k} of the second turn ({report['conversations']} "
        "conversations from SQuAD)",
        "",
        f"| searched for | recall@{k} |",
        "|---|---|",
        f"| the second turn as asked (`off`) | {r['off']:.3f} |",
        f"| previous user question + second turn (`previous`) | {r['previous']:.3f} |",
        f"| SLM rewrite, `previous` when unusable (`condense`) | {r['condense']:.3f} |",
        f"| (the original SQuAD question, naming its subject) | {r['original_question']:.3f} |",
        "",
        f"The rewrite was unusable and fell back {report['condense_fell_back']} times.",
        "",
        "| second turn | condensed |",
        "|---|---|",
    ]
    for row in report["examples"]:
        lines.append(f"| {row['question']} | {row['condense']['query']} |")
    return "\n".join(lines)


def plot(report: dict[str, Any]):
    def draw(ax: Any) -> None:
        r = report["recall_at_k"]
        names = ["off", "previous", "condense", "original_question"]
        ax.bar(names, [r[n] for n in names], color=["#999", "#69c", "#36a", "#ccc"])
        for i, n in enumerate(names):
            ax.text(i, r[n] + 0.01, f"{r[n]:.2f}", ha="center")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"recall@{report['k']} of the second turn")
        ax.set_title(f"Follow-up questions ({report['conversations']} conversations)")

    return draw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squad", type=Path, required=True, help="SQuAD v1.1 JSON")
    ap.add_argument("--limit", type=int, default=150, help="conversations")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/followups")
    args = ap.parse_args(argv)
    report = run(args)
    slim = {k: v for k, v in report.items() if k != "rows"}
    publish(
        Path(args.out),
        {**slim, "rows": report["rows"]},
        markdown(report),
        {"recall.png": plot(report)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
