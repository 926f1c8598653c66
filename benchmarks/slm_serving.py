"""SLM tokens/s inside a Serve replica vs llama.cpp called directly, and /v1/answer latency
against a reference: raw llama-cpp-python on the bundled model as shipped, reading a 1,000-token
prompt (what a 5-passage answer sends) and writing 160 tokens.

Both sides run in one invocation, interleaved round by round, with the same prompt, max tokens
and threads, so the ratios are robust to a noisy machine. The cluster uses the llama.cpp set-up
it chooses (`--quantization` to pin one, e.g. `bundled` for the model as shipped). Writes
report.json, report.md and tokens_per_s.png to --out.

    python -m hybrid_serve.benchmarks.slm_serving --rounds 5 --out bench-out/slm_serving
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hybrid_serve.benchmarks.report import (
    NO_CACHE,
    Progress,
    percentile,
    start_private_ray,
    write_report,
)
from hybrid_serve.schemas import GenerationRequest

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short paragraph about the history of Paris."},
]
QUESTION = "What port does the HTTP API use?"
# Short questions on the sample corpus the cluster indexes at start, asked in turn.
QUESTIONS = (
    QUESTION,
    "How do I add documents to the index?",
    "When is a question escalated to Claude?",
    "How is hybrid-serve deployed on Kubernetes?",
    "Which retrieval methods are combined?",
)
REFERENCE_PROMPT_TOKENS = 1000
REFERENCE_GENERATED_TOKENS = 160


class Reference:
    """Raw llama-cpp-python on the bundled GGUF, nothing of ours in between: the floor an
    answer's latency is compared with. Each call reads the whole prompt (the KV cache is reset)
    and writes exactly 160 tokens (end of text barred)."""

    def __init__(self, threads: int) -> None:
        import llama_cpp

        from hybrid_serve.bundled import bundled_gguf

        self.llm = llama_cpp.Llama(
            str(bundled_gguf()), n_ctx=4096, n_threads=threads, verbose=False
        )
        corpus = Path(__file__).resolve().parents[1] / "cluster" / "sample_corpus"
        text = "\n\n".join(p.read_text() for p in sorted(corpus.glob("*.md")))
        tokens = self.llm.tokenize(text.encode())[:REFERENCE_PROMPT_TOKENS]
        self.prompt = tokens
        self.no_end = {self.llm.token_eos(): float("-inf")}

    def seconds(self) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        out = self.llm.create_completion(
            self.prompt,
            max_tokens=REFERENCE_GENERATED_TOKENS,
            temperature=0.0,
            logit_bias=self.no_end,
        )
        took = time.perf_counter() - t0
        assert isinstance(out, dict)  # not streamed
        assert out["usage"]["completion_tokens"] == REFERENCE_GENERATED_TOKENS, out["usage"]
        return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--answers", type=int, default=20, help="/v1/answer requests to time")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--quantization",
        help="pin the cluster's slm.llama_cpp.quantization (default: what it chooses)",
    )
    ap.add_argument("--out", default="bench-out/slm_serving")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.deployments.app import build
    from hybrid_serve.engines.llama_cpp import LlamaCppEngine

    req = GenerationRequest(messages=PROMPT, max_tokens=args.max_tokens)
    progress = Progress("slm_serving")

    progress.say("loading llama.cpp in this process")
    direct = LlamaCppEngine(bundled_gguf(), n_threads=args.threads)

    data_dir = tempfile.mkdtemp(prefix="hs-bench-")
    port = 8765
    overrides: dict[str, Any] = {
        "data_dir": data_dir,
        "http.port": port,
        "slm.threads": args.threads,
    }
    if args.quantization:
        overrides["slm.llama_cpp.quantization"] = args.quantization
    cfg = HybridServeConfig.load(overrides=overrides)
    progress.say("starting Ray and the application")
    start_private_ray(4, port)
    serve.run(build(cfg), name="hybrid-serve", route_prefix="/")
    slm = serve.get_deployment_handle("SLM", app_name="hybrid-serve")
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
        time.sleep(0.5)

    # Warm both sides once (first call pays page faults and allocation).
    direct.generate_blocking(req)
    slm.generate.remote(req).result()

    rows: list[dict[str, Any]] = []
    for i in range(args.rounds):
        progress.step(i + 1, args.rounds, "direct vs replica")
        d = direct.generate_blocking(req)
        t0 = time.perf_counter()
        r = slm.generate.remote(req).result()
        handle_s = time.perf_counter() - t0
        rows.append(
            {
                "direct_tok_s": d.completion_tokens / d.seconds,
                "replica_tok_s": r.completion_tokens / r.seconds,
                "through_handle_tok_s": r.completion_tokens / handle_s,
                "tokens": r.completion_tokens,
            }
        )

    progress.say("loading the reference (raw llama-cpp-python, the bundled model)")
    reference = Reference(args.threads)
    reference.seconds()  # warm
    latencies, reference_ms, prompt_tokens = [], [], []
    # Each question's answers: what its latency is made of (written tokens, why it stopped).
    by_query: dict[str, list[dict[str, Any]]] = {q: [] for q in QUESTIONS}
    failures: list[dict[str, Any]] = []
    with httpx.Client(timeout=300, headers=NO_CACHE) as client:
        setup = client.get(f"{url}/readyz").json()
        client.post(f"{url}/v1/answer", json={"query": QUESTION})  # warm
        for i in range(args.answers):
            progress.step(i + 1, args.answers, "/v1/answer and the reference, in turn")
            reference_ms.append(reference.seconds() * 1000)
            t0 = time.perf_counter()
            query = QUESTIONS[i % len(QUESTIONS)]
            r = client.post(f"{url}/v1/answer", json={"query": query})
            took = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:  # reported, not dropped: a failure is a finding
                failures.append(
                    {"query": query, "status": r.status_code, "ms": took, "body": r.text[:500]}
                )
                continue
            latencies.append(took)
            body = r.json()
            prompt_tokens.append(body["usage"]["slm_prompt_tokens"])
            by_query[query].append(
                {
                    "ms": took,
                    "written": body["usage"]["slm_completion_tokens"],
                    "repetition": "repetition" in body["escalation"]["reasons"],
                    # stopped reciting (slm.max_recited_words), or kept as a long copy
                    "copied": "copied_passage" in body["escalation"]["reasons"],
                }
            )
    progress.done()

    serve.shutdown()
    ray.shutdown()

    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    report: dict[str, Any] = {
        "config": {
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "model": direct.model_name,
        },
        "tokens_per_s": {
            "direct_median": med["direct_tok_s"],
            "replica_median": med["replica_tok_s"],
            "through_handle_median": med["through_handle_tok_s"],
            "replica_over_direct": med["replica_tok_s"] / med["direct_tok_s"],
            "through_handle_over_direct": med["through_handle_tok_s"] / med["direct_tok_s"],
        },
        "answer_latency_ms": {
            "queries": list(QUESTIONS),
            "n": len(latencies),
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "max": max(latencies),
            "slm_prompt_tokens_median": statistics.median(prompt_tokens),
            "by_query": {
                q: {
                    "p50": percentile([a["ms"] for a in got], 50),
                    "written_median": statistics.median(a["written"] for a in got),
                    "reason_repetition": sum(a["repetition"] for a in got),
                    "reason_copied_passage": sum(a["copied"] for a in got),
                }
                for q, got in by_query.items()
                if got
            },
        },
        "reference_ms": {
            "what": f"raw llama-cpp-python, bundled model, {REFERENCE_PROMPT_TOKENS}-token "
            f"prompt, {REFERENCE_GENERATED_TOKENS} generated",
            "p50": percentile(reference_ms, 50),
        },
        "answer_failures": failures,
        "answer_p50_over_reference": percentile(latencies, 50) / percentile(reference_ms, 50),
        "slm_setup": _setup(setup),
        "rounds": rows,
    }
    tps = report["tokens_per_s"]
    md = [
        "# SLM serving: replica vs llama.cpp direct",
        "",
        f"{args.rounds} interleaved rounds, {args.max_tokens} max tokens, {args.threads} threads.",
        "",
        "| path | tokens/s (median) | ratio to direct |",
        "|---|---|---|",
        f"| llama.cpp in-process | {tps['direct_median']:.1f} | 1.00 |",
        f"| inside the SLM replica | {tps['replica_median']:.1f} "
        f"| {tps['replica_over_direct']:.2f} |",
        f"| through the Serve handle | {tps['through_handle_median']:.1f} "
        f"| {tps['through_handle_over_direct']:.2f} |",
        "",
        f"`/v1/answer` for {len(QUESTIONS)} short questions in turn: p50 "
        f"{report['answer_latency_ms']['p50']:.0f} ms, p90 "
        f"{report['answer_latency_ms']['p90']:.0f} ms over {len(latencies)} requests "
        f"(median SLM prompt {report['answer_latency_ms']['slm_prompt_tokens_median']:.0f} "
        "tokens); the reference "
        f"({report['reference_ms']['what']}) p50 {report['reference_ms']['p50']:.0f} ms: "
        f"**{report['answer_p50_over_reference']:.2f}x** the reference. Failed answers: "
        f"{len(failures)}"
        + "".join(f"; {f['status']} after {f['ms']:.0f} ms: {f['body'][:200]}" for f in failures),
        "",
        "Reasons (`repetition`: a loop stopped; `copied_passage`: a recitation stopped, or a "
        "long copy) are named for answers below the escalation threshold.",
        "",
        "| question | answer p50 | tokens written (median) | `repetition` | `copied_passage` |",
        "|---|---|---|---|---|",
        *(
            f"| {q} | {a['p50']:.0f} ms | {a['written_median']:.0f} | {a['reason_repetition']} "
            f"| {a['reason_copied_passage']} |"
            for q, a in report["answer_latency_ms"]["by_query"].items()
        ),
        "",
        f"The cluster's llama.cpp set-up: `{json.dumps(report['slm_setup'])}`.",
    ]

    def plot(ax: Any) -> None:
        labels = ["direct", "replica", "handle"]
        values = [tps["direct_median"], tps["replica_median"], tps["through_handle_median"]]
        ax.bar(labels, values, color=["#888", "#1f77b4", "#2ca02c"])
        ax.set_ylabel("generated tokens / s (median)")
        ax.set_title("SmolLM2-135M, llama.cpp: replica vs direct")

    out = write_report(Path(args.out), report, "\n".join(md), {"tokens_per_s.png": plot})
    print(json.dumps(report["tokens_per_s"], indent=2))
    print(json.dumps(report["answer_latency_ms"], indent=2))
    print(f"answer p50 / reference: {report['answer_p50_over_reference']:.2f}")
    print(f"wrote {out}")
    return 0


def _setup(readyz: dict[str, Any]) -> Any:
    """The llama.cpp set-up the SLM replica reports in /readyz (None if it does not say)."""
    slm = readyz.get("components", {}).get("slm", {})
    return slm.get("setup") if isinstance(slm, dict) else None


if __name__ == "__main__":
    raise SystemExit(main())
