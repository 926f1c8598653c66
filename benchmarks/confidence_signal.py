"""How much the confidence signal costs, and how well it separates right from wrong answers.

Overhead: SLM generation with token log-probabilities (read from the logits llama.cpp already
computes) vs without, interleaved in one process; optionally also llama.cpp's own `logits_all`
route for reference. Separation: on SQuAD questions answered by the SLM alone (retrieval over the
file's paragraphs, in process), AUROC of the confidence for "F1 > 0.5", and the escalation rate
at the configured threshold.

    python -m hybrid_serve.benchmarks.confidence_signal \
        --squad ../shared/data/squad/squad-v1.1-dev-part-a.json \
        --limit 100 --out bench-out/confidence
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hybrid_serve.agents.context import RequestOptions
from hybrid_serve.agents.pipeline import Pipeline
from hybrid_serve.benchmarks.report import Progress, publish
from hybrid_serve.benchmarks.scoring import auroc, f1_score, strip_citations
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.schemas import AnswerRequest, GenerationRequest

PROMPT = [{"role": "user", "content": "Write a short paragraph about the history of Paris."}]


def overhead(rounds: int, max_tokens: int, threads: int, logits_all: bool, progress: Progress):
    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.engines.llama_cpp import LlamaCppEngine

    engine = LlamaCppEngine(bundled_gguf(), n_threads=threads)
    with_lp = GenerationRequest(messages=PROMPT, max_tokens=max_tokens, logprobs=True)
    without = GenerationRequest(messages=PROMPT, max_tokens=max_tokens, logprobs=False)
    engine.generate_blocking(with_lp)  # warm-up
    rows = []
    for i in range(rounds):
        progress.step(i + 1, rounds, "logprobs on/off")
        a = engine.generate_blocking(without)
        b = engine.generate_blocking(with_lp)
        rows.append(
            {
                "off_tok_s": a.completion_tokens / a.seconds,
                "on_tok_s": b.completion_tokens / b.seconds,
            }
        )
    out: dict[str, Any] = {
        "off_tok_s": statistics.median(r["off_tok_s"] for r in rows),
        "on_tok_s": statistics.median(r["on_tok_s"] for r in rows),
    }
    out["throughput_ratio"] = out["on_tok_s"] / out["off_tok_s"]
    out["overhead"] = 1 - out["throughput_ratio"]
    if logits_all:
        from llama_cpp import Llama

        llm = Llama(
            str(bundled_gguf()), n_ctx=2048, n_threads=threads, logits_all=True, verbose=False
        )
        prompt = engine._formatter(messages=PROMPT).prompt  # type: ignore[arg-type]  # plain dicts
        speeds = []
        for i in range(max(1, rounds // 2)):
            progress.step(i + 1, max(1, rounds // 2), "logits_all reference")
            t0 = time.perf_counter()
            r: Any = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, logprobs=1)
            speeds.append(r["usage"]["completion_tokens"] / (time.perf_counter() - t0))
        out["logits_all_tok_s"] = statistics.median(speeds)
        out["logits_all_ratio"] = out["logits_all_tok_s"] / out["off_tok_s"]
    return out, rows


def load_squad(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(paragraph documents, questions with their gold paragraph id and answers)."""
    data = json.loads(path.read_text())["data"]
    docs, questions = [], []
    for a, article in enumerate(data):
        for p, para in enumerate(article["paragraphs"]):
            doc_id = f"squad-{a}-{p}"
            docs.append(
                {"id": doc_id, "title": article["title"].replace("_", " "), "text": para["context"]}
            )
            for qa in para["qas"]:
                questions.append(
                    {
                        "question": qa["question"],
                        "doc_id": doc_id,
                        "answers": [x["text"] for x in qa["answers"]],
                    }
                )
    return docs, questions


def squad_index(docs: list[dict[str, Any]], progress: Progress) -> Any:
    """An in-process index of the SQuAD paragraphs, as the retriever would build it."""
    from hybrid_serve.retrieval.embedder import Embedder
    from hybrid_serve.retrieval.store import IndexStore, NewDocument

    cfg = HybridServeConfig.load()
    embedder = Embedder()
    store = IndexStore(
        tempfile.mkdtemp(prefix="hs-squad-"),
        embedder.encode,
        embedder.dim,
        chunk_words=cfg.retriever.chunk_words,
        chunk_overlap_words=cfg.retriever.chunk_overlap_words,
    )
    store.upsert(
        [NewDocument(**d) for d in docs],
        progress=lambda done, total: progress.step(done, total, "embedding paragraphs"),
    )
    return store


def separation(squad: Path, limit: int, seed: int, threads: int, progress: Progress):
    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.engines.llama_cpp import LlamaCppEngine

    cfg = HybridServeConfig.load()
    docs, questions = load_squad(squad)
    random.Random(seed).shuffle(questions)
    questions = questions[:limit]
    store = squad_index(docs, progress)
    engine = LlamaCppEngine(bundled_gguf(), n_threads=threads)

    async def retrieve(query: str, top_k: int, collections=None):
        return store.search(query, top_k)

    pipe = Pipeline(retrieve, engine.generate, cfg)
    rows = []

    async def run() -> None:
        for i, q in enumerate(questions):
            progress.step(i + 1, len(questions), "SLM answers")
            req = AnswerRequest(query=q["question"], mode="slm")
            r = await pipe.answer(RequestOptions(req), f"q{i}")
            f1 = f1_score(strip_citations(r.answer), q["answers"])
            rows.append(
                {
                    "question": q["question"],
                    "answer": r.answer,
                    "gold": q["answers"],
                    "f1": f1,
                    "confidence": r.confidence,
                    "cited_gold": any(c.doc_id == q["doc_id"] for c in r.citations),
                }
            )

    asyncio.run(run())
    scores = [r["confidence"] for r in rows]
    right = [r["f1"] > 0.5 for r in rows]
    threshold = cfg.escalation.threshold
    return {
        "questions": len(rows),
        "accuracy_f1_gt_0_5": sum(right) / len(rows),
        "mean_f1": statistics.mean(r["f1"] for r in rows),
        "auroc": auroc(scores, right),
        "threshold": threshold,
        "escalation_rate": sum(s < threshold for s in scores) / len(rows),
    }, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--logits-all", action="store_true", help="also time llama.cpp logits_all")
    ap.add_argument("--squad", type=Path, help="SQuAD JSON for the separation measurement")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/confidence")
    args = ap.parse_args(argv)
    progress = Progress("confidence")
    over, over_rows = overhead(
        args.rounds, args.max_tokens, args.threads, args.logits_all, progress
    )
    report: dict[str, Any] = {"overhead": over, "overhead_rounds": over_rows}
    md = [
        "# Confidence: cost and separation",
        "",
        f"Generation, {args.max_tokens} tokens, {args.threads} threads, median of "
        f"{args.rounds} interleaved rounds:",
        "",
        "| | tokens/s | ratio |",
        "|---|---|---|",
        f"| no log-probabilities | {over['off_tok_s']:.1f} | 1.00 |",
        f"| with log-probabilities (ours) | {over['on_tok_s']:.1f} | "
        f"{over['throughput_ratio']:.3f} |",
    ]
    if "logits_all_tok_s" in over:
        md.append(
            f"| llama.cpp `logits_all` | {over['logits_all_tok_s']:.1f} | "
            f"{over['logits_all_ratio']:.3f} |"
        )
    md += ["", f"Confidence costs {over['overhead'] * 100:.1f} % of generation throughput."]
    if args.squad:
        sep, rows = separation(args.squad, args.limit, args.seed, args.threads, progress)
        report["separation"] = sep
        report["answers"] = rows
        md += [
            "",
            f"## Separation on {sep['questions']} SQuAD questions (SLM alone)",
            "",
            f"- right answers (F1 > 0.5): {sep['accuracy_f1_gt_0_5']:.2f}; mean F1 "
            f"{sep['mean_f1']:.3f}",
            f"- AUROC of confidence for right vs wrong: {sep['auroc']:.3f}"
            if sep["auroc"] is not None
            else "- AUROC: undefined",
            f"- escalation rate at threshold {sep['threshold']}: {sep['escalation_rate']:.2f}",
        ]
    progress.done()

    def plot_speed(ax: Any) -> None:
        labels = ["off", "ours"] + (["logits_all"] if "logits_all_tok_s" in over else [])
        values = [over["off_tok_s"], over["on_tok_s"]] + (
            [over["logits_all_tok_s"]] if "logits_all_tok_s" in over else []
        )
        ax.bar(labels, values, color=["#888", "#1f77b4", "#d62728"][: len(values)])
        ax.set_ylabel("tokens / s")
        ax.set_title("Generation speed with token log-probabilities")

    plots = {"overhead.png": plot_speed}
    if args.squad:

        def plot_sep(ax: Any) -> None:
            good = [r["confidence"] for r in report["answers"] if r["f1"] > 0.5]
            bad = [r["confidence"] for r in report["answers"] if r["f1"] <= 0.5]
            ax.hist(
                [good, bad],
                bins=10,
                range=(0, 1),
                label=["F1 > 0.5", "F1 ≤ 0.5"],
                color=["#2ca02c", "#d62728"],
            )
            ax.axvline(
                report["separation"]["threshold"], color="k", linestyle="--", label="threshold"
            )
            ax.set_xlabel("confidence")
            ax.set_ylabel("answers")
            ax.legend()
            ax.set_title("SLM confidence, right vs wrong")

        plots["separation.png"] = plot_sep
    publish(Path(args.out), report, "\n".join(md), plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
