"""Latency of each escalation step (plan, rewrite, verify, answer) against an LLM tier: the
roles exactly as ClaudeProxy sends them (prompts, forced tool calls, token ceilings), through the
`anthropic` SDK, to any Messages-API endpoint — the cluster's own vLLM tier (`hybrid-serve up`
with llm.deploy) or Anthropic's API. Per role: latency p50/p95, output tokens, and how often
the step gave a usable result (a tool call validating against its schema) or degraded.

    hybrid-serve up  # with HYBRID_SERVE_LLM__DEPLOY__ENABLED=true, ... (README)
    python -m hybrid_serve.benchmarks.tier_latency --base-url http://127.0.0.1:8000/llm \
        --model smollm2-135m-instruct --on-premises --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from hybrid_serve.agents.interfaces import LLMCall, Role, Unavailable
from hybrid_serve.agents.llm_gateway import LLMGateway
from hybrid_serve.agents.roles import ROLES
from hybrid_serve.benchmarks.report import Progress, percentile, publish
from hybrid_serve.config import LLMConfig, PolicyConfig
from hybrid_serve.schemas import Passage

STEPS: tuple[Role, ...] = ("plan", "rewrite", "verify", "answer")
PASSAGES = [
    Passage(
        chunk_id="http#0",
        doc_id="05-http-api",
        title="HTTP API",
        text="The HTTP API listens on port 8000 by default; set http.port to change it.",
    ),
    Passage(
        chunk_id="docs#0",
        doc_id="03-documents",
        title="Documents",
        text="Add documents with `hybrid-serve index add PATH` or POST /v1/documents.",
    ),
]
QUESTIONS = [
    "What port does the HTTP API use, and how do I add documents?",
    "How do I change the port the API listens on?",
    "Which command adds a folder of documents to the index?",
]


async def measure(gateway: LLMGateway, rounds: int, progress: Progress) -> list[dict]:
    rows = []
    total = rounds * len(QUESTIONS) * len(STEPS)
    for r in range(rounds):
        for q, question in enumerate(QUESTIONS):
            for role in STEPS:
                call = LLMCall(
                    f"bench-{r}-{q}-{role}",
                    question,
                    PASSAGES,
                    "redact",
                    answer="The API uses port 8000 [1]; add documents with index add [2].",
                )
                started = time.perf_counter()
                row: dict[str, Any] = {"role": role, "question": q}
                try:
                    result = await gateway.call(role, call)
                    row.update(ok=True, output_tokens=result.usage.output_tokens)
                except Unavailable as exc:
                    row.update(ok=False, reason=exc.reason, output_tokens=0)
                row["latency_s"] = round(time.perf_counter() - started, 3)
                rows.append(row)
                await gateway.finish_request(call.request_id, 0.0, 0.0)
                progress.step(len(rows), total, role)
    return rows


def summarize(rows: list[dict], cfg: LLMConfig, base_url: str | None) -> dict[str, Any]:
    steps = {}
    for role in STEPS:
        mine = [r for r in rows if r["role"] == role]
        latencies = [r["latency_s"] for r in mine]
        reasons = sorted({r["reason"] for r in mine if not r["ok"]})
        steps[role] = {
            "calls": len(mine),
            "usable": sum(r["ok"] for r in mine) / len(mine),
            "latency_p50_s": round(percentile(latencies, 50), 3),
            "latency_p95_s": round(percentile(latencies, 95), 3),
            "output_tokens_mean": round(sum(r["output_tokens"] for r in mine) / len(mine), 1),
            "max_tokens": ROLES[role].max_tokens or min(cfg.max_tokens, 1024),
            "degraded_reasons": reasons,
        }
    return {"base_url": base_url, "model": cfg.model, "tier": cfg.tier, "steps": steps}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# LLM tier step latency — {report['model']} ({report['tier']}, "
        f"{report['base_url'] or 'Anthropic API'})",
        "",
        "| step | calls | usable | p50 s | p95 s | output tokens (mean) | max_tokens | degraded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for role, s in report["steps"].items():
        lines.append(
            f"| {role} | {s['calls']} | {s['usable']:.0%} | {s['latency_p50_s']:.2f} | "
            f"{s['latency_p95_s']:.2f} | {s['output_tokens_mean']} | {s['max_tokens']} | "
            f"{', '.join(s['degraded_reasons']) or '—'} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any]) -> Any:
    def draw(ax: Any) -> None:
        names = list(report["steps"])
        p50 = [report["steps"][n]["latency_p50_s"] for n in names]
        p95 = [report["steps"][n]["latency_p95_s"] for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
        ax.bar([i + 0.2 for i in x], p95, width=0.4, label="p95")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("seconds")
        ax.set_title(f"Escalation steps on {report['model']}")
        ax.legend()

    return draw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", help="Messages API root; unset: Anthropic's API")
    ap.add_argument("--model", required=True)
    ap.add_argument("--key-env", default="ANTHROPIC_API_KEY", help="variable holding the key")
    ap.add_argument("--on-premises", action="store_true", help="send the full tool schemas")
    ap.add_argument("--max-tokens", type=int, default=160, help="the answer step's ceiling")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-out/llm-tier")
    args = ap.parse_args(argv)
    from hybrid_serve.agents.llm_gateway import tier_client

    progress = Progress("llm-tier")
    cfg = LLMConfig(
        model=args.model, on_premises=args.on_premises, max_tokens=args.max_tokens, timeout_s=300
    )
    client, reason = tier_client(args.base_url, os.environ.get(args.key_env))
    if client is None:
        raise SystemExit(f"no client for the tier: {reason}")
    gateway = LLMGateway(cfg, PolicyConfig(), client)
    rows = asyncio.run(measure(gateway, args.rounds, progress))
    progress.done()
    report = summarize(rows, cfg, args.base_url)
    publish(Path(args.out), {**report, "rows": rows}, markdown(report), {"steps.png": plot(report)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
