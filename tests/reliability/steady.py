"""Steady closed-loop load on the reliability app, with an optional fault at a given second, and
its timeline (JSON, Markdown, PNG) through the benchmarks' report writer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.report import percentile, write_report

QUERIES = [
    "What port does the API use?",
    "How are documents split into chunks?",
    "When does the cluster call Claude?",
    "How is the index stored on disk?",
]


@dataclass
class Sample:
    t: float  # seconds since the run started
    latency_ms: float
    status: int
    route: str
    degraded: list[str]
    error: str = ""


def run(
    url: str,
    headers: dict[str, str],
    duration_s: float,
    clients: int,
    body: Callable[[int], dict[str, Any]] | None = None,
    fault_at_s: float | None = None,
    fault: Callable[[], None] | None = None,
) -> tuple[list[Sample], float | None]:
    """`clients` back-to-back clients for `duration_s`; `fault()` runs at `fault_at_s` from a
    thread (it may block). Returns the samples and when the fault ran."""
    make = body or (
        lambda i: {"query": QUERIES[i % len(QUERIES)], "mode": "slm", "verify": "never"}
    )
    samples: list[Sample] = []
    fault_time: list[float] = []
    start = time.monotonic()

    def inject() -> None:
        time.sleep(max(0.0, (fault_at_s or 0) - (time.monotonic() - start)))
        fault_time.append(time.monotonic() - start)
        assert fault is not None
        fault()

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        i = c
        while time.monotonic() - start < duration_s:
            sent = time.monotonic()
            try:
                r = await client.post("/v1/answer", json=make(i))
                data = (
                    r.json()
                    if r.headers.get("content-type", "").startswith("application/json")
                    else {}
                )
                sample = Sample(
                    sent - start,
                    (time.monotonic() - sent) * 1000,
                    r.status_code,
                    str(data.get("route", "")),
                    list(data.get("degraded", [])),
                    "" if r.status_code == 200 else r.text[:300],
                )
            except httpx.HTTPError as exc:
                sample = Sample(
                    sent - start, (time.monotonic() - sent) * 1000, 0, "", [], repr(exc)
                )
            samples.append(sample)
            i += clients

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
            await asyncio.gather(*(client_loop(client, c) for c in range(clients)))

    thread = None
    if fault is not None and fault_at_s is not None:
        thread = threading.Thread(target=inject, daemon=True)
        thread.start()
    asyncio.run(main())
    if thread is not None:
        thread.join(timeout=120)
    return sorted(samples, key=lambda s: s.t), (fault_time[0] if fault_time else None)


def summary(samples: list[Sample], fault_s: float | None, window_s: float = 10.0) -> dict[str, Any]:
    lat = [s.latency_ms for s in samples]
    before = [s.latency_ms for s in samples if fault_s is not None and s.t < fault_s]
    after = [
        s.latency_ms for s in samples if fault_s is not None and fault_s <= s.t < fault_s + window_s
    ]
    out: dict[str, Any] = {
        "requests": len(samples),
        "errors": sum(1 for s in samples if s.status != 200),
        "statuses": sorted({s.status for s in samples}),
        "p50_ms": round(percentile(lat, 50), 1),
        "p99_ms": round(percentile(lat, 99), 1),
        "max_ms": round(max(lat), 1) if lat else None,
    }
    if fault_s is not None:
        out.update(
            fault_at_s=round(fault_s, 2),
            p50_before_ms=round(percentile(before, 50), 1),
            max_in_window_ms=round(max(after), 1) if after else None,
            window_s=window_s,
        )
    return out


def report(
    out: Path, title: str, samples: list[Sample], fault_s: float | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """Writes the timeline; returns the summary."""
    summ = {**summary(samples, fault_s), **extra}
    md = [f"# {title}", "", "| field | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in summ.items()]

    def plot(ax: Any) -> None:
        ok = [s for s in samples if s.status == 200]
        bad = [s for s in samples if s.status != 200]
        ax.scatter([s.t for s in ok], [s.latency_ms for s in ok], s=6, label="200")
        if bad:
            ax.scatter(
                [s.t for s in bad], [s.latency_ms for s in bad], s=12, color="red", label="error"
            )
        if fault_s is not None:
            ax.axvline(fault_s, color="red", linestyle="--", linewidth=1, label="fault")
        ax.set_xlabel("seconds")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.legend(fontsize=8)

    write_report(
        out,
        {"summary": summ, "samples": [asdict(s) for s in samples]},
        "\n".join(md),
        {"timeline.png": plot},
    )
    return summ
