"""Steady closed-loop load on the reliability app (the load harness's own clients) with a fault
at a given second, and its timeline (JSON, Markdown, PNG) through the benchmarks' report writer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hybrid_serve.benchmarks.load import Result, RunSpec, run_load
from hybrid_serve.benchmarks.report import percentile, write_report

QUERIES = [
    "What port does the API use?",
    "How are documents split into chunks?",
    "When does the cluster call Claude?",
    "How is the index stored on disk?",
]


def run(
    url: str,
    api_key: str,
    duration_s: float,
    clients: int,
    fault_at_s: float,
    fault: Callable[[], None],
) -> tuple[list[Result], float]:
    """`clients` back-to-back clients for `duration_s`; `fault()` runs at `fault_at_s` from a
    thread (it may block). Returns the results and when the fault ran."""
    bodies = [{"query": q, "mode": "slm", "verify": "never"} for q in QUERIES]
    spec = RunSpec(url=url, duration=duration_s, concurrency=clients, warmup=0, api_key=api_key)
    fault_time: list[float] = []
    start = time.monotonic()

    def inject() -> None:
        time.sleep(max(0.0, fault_at_s - (time.monotonic() - start)))
        fault_time.append(time.monotonic() - start)
        fault()

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    results = asyncio.run(run_load(spec, bodies))
    thread.join(timeout=120)
    assert fault_time, "the fault did not run"
    return sorted(results, key=lambda r: r.scheduled), fault_time[0]


def summary(results: list[Result], fault_s: float, window_s: float = 10.0) -> dict[str, Any]:
    lat = [r.latency_ms for r in results]
    before = [r.latency_ms for r in results if r.scheduled < fault_s]
    after = [r.latency_ms for r in results if fault_s <= r.scheduled < fault_s + window_s]
    return {
        "requests": len(results),
        "errors": sum(1 for r in results if not r.ok),
        "statuses": sorted({str(r.status) for r in results}),
        "p50_ms": round(percentile(lat, 50), 1),
        "p99_ms": round(percentile(lat, 99), 1),
        "max_ms": round(max(lat), 1) if lat else None,
        "fault_at_s": round(fault_s, 2),
        "p50_before_ms": round(percentile(before, 50), 1),
        "max_in_window_ms": round(max(after), 1) if after else None,
        "window_s": window_s,
    }


def report(
    out: Path, title: str, results: list[Result], fault_s: float, extra: dict[str, Any]
) -> dict[str, Any]:
    """Writes the timeline; returns the summary."""
    summ = {**summary(results, fault_s), **extra}
    md = [f"# {title}", "", "| field | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in summ.items()]

    def plot(ax: Any) -> None:
        ok = [r for r in results if r.ok]
        bad = [r for r in results if not r.ok]
        ax.scatter([r.scheduled for r in ok], [r.latency_ms for r in ok], s=6, label="200")
        if bad:
            ax.scatter(
                [r.scheduled for r in bad],
                [r.latency_ms for r in bad],
                s=12,
                color="red",
                label="error",
            )
        ax.axvline(fault_s, color="red", linestyle="--", linewidth=1, label="fault")
        ax.set_xlabel("seconds")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.legend(fontsize=8)

    write_report(
        out,
        {"summary": summ, "results": [asdict(r) for r in results]},
        "\n".join(md),
        {"timeline.png": plot},
    )
    return summ
