"""Does the confidence notice a wrong name or number? AUROC on answers built from SQuAD.

For each question whose gold answer is a name or a number, an answer is written in two styles:
the gold paragraph's sentence that contains the answer, cited as [1] (`sentence`: a small model
copying), and the question restated with the answer ("In which city was X invented: Tallinn [1].",
`restated`: words the passage may not have, as a paraphrase has). Each comes in three forms:
as written (right); with the answer swapped for another question's answer of the same kind that
the paragraph does not contain (`swapped`: reads as well, lexically almost the same); and with
that other answer added after it ("… in Tallinn, Turkey [1]": `added`, the right answer plus one
unsupported name, which lexical support averages away). Each is
scored as the SLM's answer is, with the gold paragraph and two others of its article as the
retrieved passages and no token signal (no model runs here). Reported: AUROC for "right" of the
lexical support signal, of the claim signal (`entities`), and of the combined confidence without
(before) and with (after) the `unsupported_entity` penalty; by kind of answer; as a ROC plot.

    python -m hybrid_serve.benchmarks.claims \
        --squad ../shared/data/squad/squad-v1.1-dev-part-a.json --limit 1000 --out bench-out/claims
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybrid_serve.agents.citations import finalize
from hybrid_serve.agents.confidence import PENALTY, score_answer
from hybrid_serve.benchmarks.confidence_signal import load_squad
from hybrid_serve.benchmarks.report import Progress, publish
from hybrid_serve.benchmarks.scoring import auroc
from hybrid_serve.schemas import Passage
from hybrid_serve.text import split_sentences

BEFORE = {**PENALTY, "unsupported_entity": 1.0}
MAX_SENTENCE_WORDS = 60


def kind_of(answer: str) -> str | None:
    if re.search(r"\d", answer):
        return "number"
    if answer[:1].isupper():
        return "name"
    return None


def build_pairs(path: Path, limit: int, seed: int) -> list[dict[str, Any]]:
    """For up to `limit` questions, one row per answer style: the question, its passages, the
    right answer and its two wrong forms (`swapped`, `added`), the kind of answer."""
    docs, questions = load_squad(path)
    by_id = {d["id"]: d for d in docs}
    rng = random.Random(seed)
    rng.shuffle(questions)
    pool: dict[str, list[tuple[str, str]]] = {"name": [], "number": []}
    for q in questions:
        answer = q["answers"][0].strip()
        kind = kind_of(answer)
        if kind:
            pool[kind].append((q["doc_id"].rsplit("-", 1)[0], answer))
    pairs: list[dict[str, Any]] = []
    for q in questions:
        if len(pairs) >= limit * 2:  # two styles per question
            break
        answer = q["answers"][0].strip()
        kind = kind_of(answer)
        gold = by_id[q["doc_id"]]
        sentence = next((s for s in split_sentences(gold["text"]) if answer in s), None)
        if not kind or sentence is None or len(sentence.split()) > MAX_SENTENCE_WORDS:
            continue
        article = q["doc_id"].rsplit("-", 1)[0]
        candidates = [
            a
            for art, a in pool[kind]
            if art != article and a.lower() not in gold["text"].lower() and a != answer
        ]
        swap = rng.choice(candidates)
        siblings = [d for d in docs if d["id"].startswith(article + "-") and d is not gold]
        others = rng.sample(siblings, min(2, len(siblings)))
        passages = [
            Passage(
                chunk_id=f"{d['id']}#0",
                doc_id=d["id"],
                title=d["title"],
                text=d["text"],
                score=1.0 / (i + 1),
                dense_score=0.6 - 0.1 * i,
            )
            for i, d in enumerate([gold, *others])
        ]
        styles = {
            "sentence": re.sub(r"([.!?]?)$", r" [1]\1", sentence.rstrip(), count=1),
            "restated": f"{q['question'].strip().rstrip('?').strip()}: {answer} [1].",
        }
        for style, cited in styles.items():
            pairs.append(
                {
                    "question": q["question"],
                    "kind": kind,
                    "style": style,
                    "passages": passages,
                    "right": cited,
                    "swapped": cited.replace(answer, swap, 1),
                    "added": cited.replace(answer, f"{answer}, {swap}", 1),
                    "answer": answer,
                    "swap": swap,
                }
            )
    return pairs


def score_pairs(pairs: list[dict[str, Any]], progress: Progress) -> list[dict[str, Any]]:
    rows = []
    for i, pair in enumerate(pairs):
        progress.step(i + 1, len(pairs), "scoring")
        for label in ("right", *VARIANTS):
            text, cites = finalize(pair[label], pair["passages"])
            after = score_answer(pair["question"], text, cites, pair["passages"], None)
            before = score_answer(
                pair["question"], text, cites, pair["passages"], None, penalties=BEFORE
            )
            rows.append(
                {
                    "kind": pair["kind"],
                    "style": pair["style"],
                    "form": label,
                    "right": label == "right",
                    "support": after.signals["support"],
                    "entities": after.signals["entities"],
                    "before": before.score,
                    "after": after.score,
                    "flagged": "unsupported_entity" in after.reasons,
                    "answer": text,
                }
            )
    return rows


SIGNALS = ("support", "entities", "before", "after")
VARIANTS = ("swapped", "added")
STYLES = ("sentence", "restated")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """AUROC of each signal for right vs each wrong form, over all answers and by kind."""
    out: dict[str, Any] = {}
    groups = [(s, v, k) for s in STYLES for v in VARIANTS for k in ("all", "name", "number")]
    for style, variant, kind in groups:
        sel = [
            r
            for r in rows
            if r["style"] == style
            and r["form"] in ("right", variant)
            and (kind == "all" or r["kind"] == kind)
        ]
        if not sel:
            continue
        right = [r for r in sel if r["right"]]
        wrong = [r for r in sel if not r["right"]]
        out[f"{style}/{variant}/{kind}"] = {
            "answers": len(sel),
            **{
                f"auroc_{s}": auroc([r[s] for r in sel], [r["right"] for r in sel]) for s in SIGNALS
            },
            "flagged_wrong": sum(r["flagged"] for r in wrong) / max(1, len(wrong)),
            "flagged_right": sum(r["flagged"] for r in right) / max(1, len(right)),
        }
    return out


def roc(scores: list[float], labels: list[bool]) -> tuple[list[float], list[float]]:
    pos = sum(labels)
    neg = len(labels) - pos
    fpr, tpr = [0.0], [0.0]
    for t in sorted(set(scores), reverse=True):
        tpr.append(sum(s >= t and y for s, y in zip(scores, labels)) / pos)
        fpr.append(sum(s >= t and not y for s, y in zip(scores, labels)) / neg)
    return fpr, tpr


def plot(rows: list[dict[str, Any]], summary: dict[str, Any]) -> Callable[[Any], None]:
    names = {
        "support": "lexical support",
        "entities": "claim support",
        "before": "confidence before",
        "after": "confidence after",
    }

    def draw(ax: Any) -> None:
        sel = [r for r in rows if r["style"] == "restated" and r["form"] in ("right", "added")]
        labels = [r["right"] for r in sel]
        for s in SIGNALS:
            fpr, tpr = roc([r[s] for r in sel], labels)
            auc = summary["restated/added/all"][f"auroc_{s}"]
            ax.plot(fpr, tpr, label=f"{names[s]} (AUROC {auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set_xlabel("wrong answers kept (false positive rate)")
        ax.set_ylabel("right answers kept (true positive rate)")
        ax.set_title("Restated answers: right vs one unsupported name or number added")
        ax.legend(loc="lower right", fontsize=8)

    return draw


def markdown(summary: dict[str, Any], n: int) -> str:
    lines = [
        f"## Claim support: right vs wrong answers ({n} questions, SQuAD)",
        "",
        'AUROC for "right"; *swapped*: the answer replaced by another of its kind, *added*: '
        "another of its kind added after it.",
        "",
        "| style / wrong form / answers | n | lexical support | claim support | confidence before "
        "| confidence after "
        "| wrong flagged | right flagged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, s in summary.items():
        lines.append(
            f"| {kind} | {s['answers']} | {s['auroc_support']:.3f} | {s['auroc_entities']:.3f} "
            f"| {s['auroc_before']:.3f} | {s['auroc_after']:.3f} | {s['flagged_wrong']:.1%} "
            f"| {s['flagged_right']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--squad", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=1000, help="questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-out/claims"))
    args = ap.parse_args(argv)
    progress = Progress("claims")
    pairs = build_pairs(args.squad, args.limit, args.seed)
    rows = score_pairs(pairs, progress)
    summary = summarize(rows)
    n = len(pairs) // len(STYLES)
    report = {"squad": str(args.squad), "questions": n, "summary": summary, "rows": rows}
    publish(args.out, report, markdown(summary, n), {"roc.png": plot(rows, summary)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
