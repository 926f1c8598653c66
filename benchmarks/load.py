"""Load test and capacity plan against any hybrid-serve endpoint (local, or a KubeRay ingress).

    hybrid-serve bench load --url URL [--rate R | --concurrency C] [--sweep R1,R2,...]
                            --duration SECONDS [--deadline S] [--priority batch]
                            [--batch-share 0.5]
                            [--queries FILE] --out DIR

Open loop (`--rate`, `--sweep`): arrivals are a Poisson process at the offered rate and every
request's latency counts from its scheduled arrival, so queueing shows up honestly (no coordinated
omission). Closed loop (`--concurrency`): C clients, each sending as soon as its last answer came.
The first `--warmup` seconds are sent but not counted. Everything per route, tokens and cost comes
from the responses' own `route` and `usage` fields. Goodput counts the answers that arrived inside
their deadline (`--deadline`, sent as X-Request-Timeout; else the server's default, 60 s) from
their scheduled arrival: what a client received in time, where throughput counts every answer.
`--batch-share` sends that share of the requests (drawn at random, seeded) as `X-Priority: batch`
and the rest as interactive, and reports each class's goodput (`by_priority`).

`DIR/report.json` fields (stable): `mode`, `offered_rps`, `throughput_rps`, `goodput_rps`,
`deadline_s`, `refusals` (503s: `count`, `rate`, `latency_ms`), `requests`
(`sent`, `counted`, `ok`), `latency_ms` and `ttft_ms` (`p50`, `p90`, `p95`, `p99`, `max`, ms,
over successful counted requests), `errors` (count by HTTP status, or `timeout` / `connection`),
`rate_503`, `error_rate`, `routes` (per route: `share`, `latency_ms`, `tokens`, `cost_usd`),
`cost` (mean USD per request), `slo`, `capacity_plan` (sized by goodput), and for a sweep `runs`
(one such object per rate, every rate given) and `saturation_rps`; `replica_time` (with an
admin key: the SLM replica's busy seconds during the run against the answers' summed
`slm_cost_usd`; `answers_over_busy` is 1.0 when every charge adds up; not `checked` with more
than one SLM replica, whose `/readyz` shows one replica's time). Also `report.md` and
`latency_vs_load.png`, `throughput_vs_load.png` (throughput and goodput), `cost_per_1k.png`;
with `--batch-share`, `by_priority` (per class: `sent`, `ok`, `throughput_rps`, `goodput_rps`,
`refusals`, `latency_ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from hybrid_serve.benchmarks.report import NO_CACHE, Progress, percentile, publish

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The server's deadline when a request sends none (http.request_timeout_s's default).
SERVER_DEFAULT_DEADLINE_S = 60.0
BUNDLED_QUERIES = [
    "How are documents split into chunks?",
    "What port does the HTTP API use?",
    "What does the ClaudeProxy do?",
    "How is the index stored on disk?",
    "When does a query escalate to Claude?",
    "What engines can the SLM deployment use?",
    "How are citations numbered?",
    "What happens when Claude is unavailable?",
]


# -- workload -------------------------------------------------------------------------------------


def poisson_arrivals(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Arrival times in [0, duration) of a Poisson process of `rate` per second."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def load_queries(path: str | None, limit: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """JSONL of {"query": ..., "mode": optional, ...} (any AnswerRequest fields); default: a mix
    of SQuAD and HotpotQA questions from ../shared/data, or a bundled set when that is absent."""
    if path:
        rows = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("query"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'query'")
            rows.append(row)
        if not rows:
            raise ValueError(f"{path}: no queries")
        return rows
    rows = []
    squad = sorted(DATA.glob("squad/*.json"))
    hotpot = sorted(DATA.glob("hotpotqa/*.json"))
    if squad:
        for article in json.loads(squad[0].read_text())["data"]:
            for para in article["paragraphs"]:
                rows += [{"query": qa["question"]} for qa in para["qas"]]
    if hotpot:
        rows += [{"query": q["question"]} for q in json.loads(hotpot[0].read_text())]
    if not rows:
        rows = [{"query": q} for q in BUNDLED_QUERIES]
    rng = random.Random(seed)
    rng.shuffle(rows)
    return rows[:limit]


# -- one run --------------------------------------------------------------------------------------


@dataclass
class Result:
    scheduled: float  # seconds since the run started
    latency_ms: float
    status: int | str  # HTTP status, or "timeout" / "connection"
    ttft_ms: float | None = None
    route: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    priority: str | None = None  # as sent (X-Priority), when the run mixes classes

    @property
    def ok(self) -> bool:
        return self.status == 200


async def one_request(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    stream: bool,
    t0: float,
    scheduled: float,
    priority: str | None = None,
) -> Result:
    """Latency from the scheduled arrival (open loop) or the send (closed loop: scheduled=now).
    `priority`: this request's X-Priority, over the run's."""
    result = await _one_request(client, body, stream, t0, scheduled, priority)
    result.priority = priority
    return result


async def _one_request(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    stream: bool,
    t0: float,
    scheduled: float,
    priority: str | None,
) -> Result:
    start = t0 + scheduled
    headers = {"x-priority": priority} if priority else None
    try:
        if not stream:
            r = await client.post("/v1/answer", json=body, headers=headers)
            latency = (time.perf_counter() - start) * 1000
            if r.status_code != 200:
                return Result(scheduled, latency, r.status_code)
            data = r.json()
            return Result(scheduled, latency, 200, None, data.get("route"), data.get("usage", {}))
        ttft = None
        done: dict[str, Any] | None = None
        request: dict[str, Any] = {"json": {**body, "stream": True}}
        if headers:
            request["headers"] = headers
        async with aconnect_sse(client, "POST", "/v1/answer", **request) as source:
            r = source.response
            if r.status_code != 200:
                await r.aread()
                return Result(scheduled, (time.perf_counter() - start) * 1000, r.status_code)
            async for sse in source.aiter_sse():
                if sse.event == "answer" and ttft is None:
                    ttft = (time.perf_counter() - start) * 1000
                elif sse.event == "done":
                    done = sse.json()
                elif sse.event == "error":
                    status = sse.json().get("error", {}).get("code", "stream_error")
                    return Result(scheduled, (time.perf_counter() - start) * 1000, status)
        latency = (time.perf_counter() - start) * 1000
        if done is None:
            return Result(scheduled, latency, "incomplete_stream", ttft)
        return Result(scheduled, latency, 200, ttft, done.get("route"), done.get("usage", {}))
    except httpx.TimeoutException:
        return Result(scheduled, (time.perf_counter() - start) * 1000, "timeout")
    except httpx.TransportError:
        return Result(scheduled, (time.perf_counter() - start) * 1000, "connection")


@dataclass
class RunSpec:
    url: str
    duration: float
    rate: float | None = None
    concurrency: int | None = None
    warmup: float = 5.0
    max_requests: int | None = None
    stream: bool = False
    timeout: float = 120.0
    api_key: str | None = None
    seed: int = 0
    use_cache: bool = False
    deadline_s: float | None = None  # sent as X-Request-Timeout
    priority: str | None = None  # sent as X-Priority
    batch_share: float = 0.0  # this share of the requests sent as X-Priority: batch


async def replica_time(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """The SLM replica's busy and charged seconds and the price they are charged at, from
    `/readyz` (an admin key's details); None where it does not say (another key, an older
    server)."""
    try:
        data = (await client.get("/readyz", timeout=30)).json()
    except (httpx.HTTPError, ValueError):
        return None
    slm = data.get("components", {}).get("slm", {})
    price = data.get("prices", {}).get("slm_gpu_hour_usd")
    if "replica_time" not in slm or price is None:
        return None
    replicas = slm.get("placement", {}).get("replicas", 1)
    return {**slm["replica_time"], "slm_gpu_hour_usd": price, "replicas": replicas}


async def run_load(
    spec: RunSpec,
    queries: list[dict[str, Any]],
    progress: Progress | None = None,
    replica: dict[str, Any] | None = None,
) -> list[Result]:
    """`replica`, when given, receives the SLM replica's time `before` and `after` the run."""
    rng = random.Random(spec.seed)
    headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    if not spec.use_cache:
        # A load test repeats its queries: served from the answer cache, they would measure
        # the cache rather than the cluster's capacity.
        headers.update(NO_CACHE)
    if spec.deadline_s is not None:
        headers["x-request-timeout"] = f"{spec.deadline_s:g}"
    if spec.priority is not None:
        headers["x-priority"] = spec.priority
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    total = spec.warmup + spec.duration
    results: list[Result] = []
    async with httpx.AsyncClient(
        base_url=spec.url.rstrip("/"), timeout=spec.timeout, limits=limits, headers=headers
    ) as client:
        if replica is not None:
            replica["before"] = await replica_time(client)
        t0 = time.perf_counter()
        sent = 0
        stop_progress = asyncio.Event()

        async def report() -> None:
            while not stop_progress.is_set() and progress is not None:
                ok = [r.latency_ms for r in results if r.ok]
                errors = sum(1 for r in results if not r.ok)
                p50 = f"{percentile(ok, 50):.0f}" if ok else "-"
                progress.say(
                    f"t={time.perf_counter() - t0:5.1f}/{total:.0f}s sent {sent} done "
                    f"{len(results)} in flight {sent - len(results)} errors {errors} p50 {p50} ms"
                )
                try:
                    await asyncio.wait_for(stop_progress.wait(), 1.0)
                except TimeoutError:
                    pass

        reporter = asyncio.create_task(report())

        def body(i: int) -> dict[str, Any]:
            return dict(queries[i % len(queries)])

        # The classes drawn from their own generator: the arrivals are those of an unmixed run.
        classes = random.Random(spec.seed + 1)

        def priority() -> str | None:
            if not spec.batch_share:
                return None
            return "batch" if classes.random() < spec.batch_share else "interactive"

        if spec.rate is not None:  # open loop
            arrivals = poisson_arrivals(spec.rate, total, rng)
            if spec.max_requests:
                arrivals = arrivals[: spec.max_requests]
            tasks = []
            for i, at in enumerate(arrivals):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(
                    one_request(client, body(i), spec.stream, t0, at, priority())
                )
                task.add_done_callback(lambda t: results.append(t.result()))
                tasks.append(task)
                sent += 1
            await asyncio.gather(*tasks)
        else:  # closed loop
            counter = iter(range(10**9))

            async def worker() -> None:
                nonlocal sent
                while time.perf_counter() - t0 < total:
                    i = next(counter)
                    if spec.max_requests and i >= spec.max_requests:
                        return
                    sent += 1
                    now = time.perf_counter() - t0
                    results.append(
                        await one_request(client, body(i), spec.stream, t0, now, priority())
                    )

            await asyncio.gather(*(worker() for _ in range(spec.concurrency or 1)))
        stop_progress.set()
        await reporter
        if replica is not None:
            replica["after"] = await replica_time(client)
    return results


# -- summaries ------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    return {
        "p50": round(percentile(values, 50), 2),
        "p90": round(percentile(values, 90), 2),
        "p95": round(percentile(values, 95), 2),
        "p99": round(percentile(values, 99), 2),
        "max": round(max(values), 2),
    }


def cost_check(results: list[Result], replica: dict[str, Any] | None) -> dict[str, Any] | None:
    """Do the answers' SLM costs add up to the replica's busy time at its price? Over the whole
    run (warm-up included, as the replica counts it); requests refused or cut off after
    generating were charged by the replica but reported by no response."""
    before, after = (replica or {}).get("before"), (replica or {}).get("after")
    if not before or not after:
        return None
    if after.get("replicas", 1) != 1:
        # /readyz reads whichever replica Serve routes the status call to: one replica's time
        # against every replica's answers would be a wrong ratio, not an approximate one.
        return {
            "checked": False,
            "why": f"{after['replicas']} SLM replicas; /readyz shows one replica's time, so "
            "the check needs a cluster with one SLM replica",
        }
    busy = after["busy_seconds"] - before["busy_seconds"]
    charged = after["charged_seconds"] - before["charged_seconds"]
    price = after["slm_gpu_hour_usd"]
    reported = sum(float(r.usage.get("slm_cost_usd", 0) or 0) for r in results if r.ok)
    busy_cost = busy * price / 3600
    return {
        "replica_busy_s": round(busy, 3),
        "replica_charged_s": round(charged, 3),
        "generations": after["generations"] - before["generations"],
        "answers_slm_cost_usd": round(reported, 8),
        "busy_time_cost_usd": round(busy_cost, 8),
        "answers_over_busy": round(reported / busy_cost, 4) if busy_cost else None,
        "checked": True,
    }


def summarize(
    results: list[Result],
    spec: RunSpec,
    slo_p95_ms: float,
    max_error_rate: float,
    replica: dict[str, Any] | None = None,
) -> dict[str, Any]:
    counted = [r for r in results if r.scheduled >= spec.warmup]
    ok = [r for r in counted if r.ok]
    window = spec.duration
    if counted:  # a bounded request count may end the run early
        window = min(spec.duration, max(r.scheduled for r in counted) - spec.warmup) or window
    errors = Counter(str(r.status) for r in counted if not r.ok)
    routes: dict[str, list[Result]] = defaultdict(list)
    for r in ok:
        routes[r.route or "unknown"].append(r)

    def mean(rs: list[Result], key: str) -> float:
        return sum(float(r.usage.get(key, 0) or 0) for r in rs) / len(rs) if rs else 0.0

    per_route = {
        name: {
            "share": round(len(rs) / len(ok), 4),
            "count": len(rs),
            "latency_ms": percentiles([r.latency_ms for r in rs]),
            "tokens": {
                "slm": round(mean(rs, "slm_prompt_tokens") + mean(rs, "slm_completion_tokens"), 1),
                "claude": round(
                    mean(rs, "claude_input_tokens") + mean(rs, "claude_output_tokens"), 1
                ),
            },
            "cost_usd": {
                "claude": round(mean(rs, "cost_usd"), 8),
                "slm": round(mean(rs, "slm_cost_usd"), 8),
                "all_claude_estimate": round(mean(rs, "all_claude_cost_usd_estimate"), 8),
            },
        }
        for name, rs in sorted(routes.items())
    }
    latency = percentiles([r.latency_ms for r in ok])
    error_rate = (len(counted) - len(ok)) / len(counted) if counted else 0.0
    p95 = latency["p95"]
    deadline_s = spec.deadline_s or SERVER_DEFAULT_DEADLINE_S
    in_time = [r for r in ok if r.latency_ms <= deadline_s * 1000]
    refused = [r for r in counted if r.status == 503]

    def one_class(rs: list[Result]) -> dict[str, Any]:
        answered = [r for r in rs if r.ok]
        good = [r for r in answered if r.latency_ms <= deadline_s * 1000]
        no = [r for r in rs if r.status == 503]
        return {
            "sent": len(rs),
            "ok": len(answered),
            "throughput_rps": round(len(answered) / window, 3) if window > 0 else 0.0,
            "goodput_rps": round(len(good) / window, 3) if window > 0 else 0.0,
            "refusals": {"count": len(no), "rate": round(len(no) / len(rs), 4) if rs else 0.0},
            "latency_ms": percentiles([r.latency_ms for r in answered]),
        }

    by_priority = None
    if spec.batch_share:
        by_priority = {
            p: one_class([r for r in counted if r.priority == p]) for p in ("interactive", "batch")
        }
    return {
        "mode": "open" if spec.rate is not None else "closed",
        "offered_rps": spec.rate,
        "concurrency": spec.concurrency,
        "stream": spec.stream,
        "duration_s": spec.duration,
        "warmup_s": spec.warmup,
        "throughput_rps": round(len(ok) / window, 3) if window > 0 else 0.0,
        "goodput_rps": round(len(in_time) / window, 3) if window > 0 else 0.0,
        "deadline_s": deadline_s,
        "refusals": {
            "count": len(refused),
            "rate": round(len(refused) / len(counted), 4) if counted else 0.0,
            "latency_ms": percentiles([r.latency_ms for r in refused]),
        },
        "requests": {"sent": len(results), "counted": len(counted), "ok": len(ok)},
        "by_priority": by_priority,
        "latency_ms": latency,
        "ttft_ms": percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "errors": dict(errors),
        "rate_503": round(errors.get("503", 0) / len(counted), 4) if counted else 0.0,
        "error_rate": round(error_rate, 4),
        "routes": per_route,
        "cost": {
            "claude_usd_per_request": round(mean(ok, "cost_usd"), 8),
            "slm_usd_per_request_reported": round(mean(ok, "slm_cost_usd"), 8),
            "all_claude_usd_per_request": round(mean(ok, "all_claude_cost_usd_estimate"), 8),
        },
        "replica_time": cost_check(results, replica),
        "slo": {
            "p95_ms": slo_p95_ms,
            "max_error_rate": max_error_rate,
            "met": bool(ok)
            and p95 is not None
            and p95 <= slo_p95_ms
            and error_rate <= max_error_rate,
        },
    }


@dataclass
class CostAssumptions:
    target_rps: float = 10.0
    headroom: float = 0.3
    slm_replicas_measured: int = 1
    gpus_per_replica: float = 1.0
    gpu_hour_usd: float = 1.20


def capacity_plan(run: dict[str, Any], a: CostAssumptions) -> dict[str, Any]:
    """Replicas and GPUs for a peak rate at the SLO, and the cost of 1,000 requests: sized by
    goodput, the answers that arrived in time."""
    per_replica = run["goodput_rps"] / max(a.slm_replicas_measured, 1)
    if not run["slo"]["met"] or per_replica <= 0:
        return {
            "feasible": False,
            "reason": "no measured rate met the SLO; lower the rate or relax the SLO",
            "assumptions": a.__dict__,
        }
    replicas = math.ceil(a.target_rps * (1 + a.headroom) / per_replica)
    gpus = replicas * a.gpus_per_replica
    slm_per_1k = gpus * a.gpu_hour_usd / 3600 / a.target_rps * 1000
    claude_per_1k = run["cost"]["claude_usd_per_request"] * 1000
    all_claude_per_1k = run["cost"]["all_claude_usd_per_request"] * 1000
    hybrid = slm_per_1k + claude_per_1k
    return {
        "feasible": True,
        "per_replica_rps_at_slo": round(per_replica, 3),
        "replicas": replicas,
        "gpus": gpus,
        "escalation_share": round(
            sum(v["share"] for k, v in run["routes"].items() if k != "slm"), 4
        ),
        "cost_per_1k_usd": {
            "slm": round(slm_per_1k, 4),
            "claude": round(claude_per_1k, 4),
            "hybrid": round(hybrid, 4),
            "all_claude": round(all_claude_per_1k, 4),
            "all_claude_over_hybrid": round(all_claude_per_1k / hybrid, 2) if hybrid else None,
        },
        "assumptions": {
            **a.__dict__,
            "note": "SLM cost = GPUs x $/GPU-hour at the target rate, whatever the utilisation; "
            "Claude cost = measured tokens x configured prices (the responses' usage.cost_usd); "
            "all-Claude = the responses' all_claude_cost_usd_estimate",
        },
    }


# -- the command ----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    runs = report.get("runs") or [report]
    lines = [
        "# Load test",
        "",
        f"Target: `{report['url']}`; {report['queries']} queries; SLO p95 <= "
        f"{report['slo']['p95_ms']:.0f} ms, errors <= {report['slo']['max_error_rate']:.1%}.",
        "",
        f"| offered | throughput rps | goodput rps (in {report['deadline_s']:g} s) | p50 | p90 "
        "| p95 | p99 | max ms | errors | refused (503) | refusal p50 ms | SLO |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lat = r["latency_ms"]
        offered = f"{r['offered_rps']} rps" if r["offered_rps"] else f"C={r['concurrency']}"
        cells = [f"{lat[k]:.0f}" if lat[k] is not None else "-" for k in lat]
        refusal = r["refusals"]["latency_ms"]["p50"]
        lines.append(
            f"| {offered} | {r['throughput_rps']:.2f} | {r['goodput_rps']:.2f} | "
            f"{' | '.join(cells)} | {sum(r['errors'].values())} | {r['refusals']['rate']:.1%} | "
            f"{'-' if refusal is None else f'{refusal:.0f}'} | "
            f"{'met' if r['slo']['met'] else 'missed'} |"
        )
    if any(r.get("by_priority") for r in runs):
        lines += [
            "",
            "## By priority",
            "",
            "| offered | class | sent | goodput rps | refused | p50 ms | p95 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            offered = f"{r['offered_rps']} rps" if r["offered_rps"] else f"C={r['concurrency']}"
            for name, c in (r.get("by_priority") or {}).items():
                lat = c["latency_ms"]
                p50, p95 = (f"{lat[k]:.0f}" if lat[k] is not None else "-" for k in ("p50", "p95"))
                lines.append(
                    f"| {offered} | {name} | {c['sent']} | {c['goodput_rps']:.3f} | "
                    f"{c['refusals']['rate']:.1%} | {p50} | {p95} |"
                )
    if report.get("saturation_rps") is not None:
        lines += [
            "",
            f"Saturation: the highest offered rate meeting the SLO was "
            f"{report['saturation_rps']} rps.",
        ]
    check = report.get("replica_time")
    if check and check.get("checked"):
        lines += [
            "",
            f"Cost check: the answers' SLM cost ${check['answers_slm_cost_usd']:.6f} against the "
            f"replica's busy time ({check['replica_busy_s']} s) at its price "
            f"${check['busy_time_cost_usd']:.6f}: x{check['answers_over_busy']} "
            f"({check['generations']} generations).",
        ]
    elif check:
        lines += ["", f"Cost check: not made ({check['why']})."]
    lines += [
        "",
        "## Routes",
        "",
        "| route | share | p50 ms | SLM tokens | Claude tokens | Claude $/req |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["routes"].items():
        lines.append(
            f"| {name} | {r['share']:.1%} | {r['latency_ms']['p50']:.0f} | {r['tokens']['slm']} "
            f"| {r['tokens']['claude']} | {r['cost_usd']['claude']:.6f} |"
        )
    plan = report["capacity_plan"]
    lines += ["", "## Capacity plan", ""]
    if plan["feasible"]:
        a, c = plan["assumptions"], plan["cost_per_1k_usd"]
        lines += [
            f"For {a['target_rps']} rps peak with {a['headroom']:.0%} headroom: "
            f"**{plan['replicas']} SLM replicas ({plan['gpus']:g} GPUs)** at "
            f"{plan['per_replica_rps_at_slo']} rps per replica measured at the SLO.",
            "",
            f"Cost per 1,000 requests: SLM ${c['slm']:.4f} + Claude ${c['claude']:.4f} = "
            f"**${c['hybrid']:.4f}** vs all-Claude ${c['all_claude']:.4f} "
            f"(x{c['all_claude_over_hybrid']}).",
            "",
            f"Assumptions: ${a['gpu_hour_usd']}/GPU-hour, {a['gpus_per_replica']} GPU per "
            f"replica, {a['slm_replicas_measured']} SLM replica(s) measured. {a['note']}.",
        ]
    else:
        lines.append(plan["reason"])
    return "\n".join(lines)


def plots(report: dict[str, Any]) -> dict[str, Any]:
    runs = report.get("runs") or [report]
    x = [r["offered_rps"] or r["throughput_rps"] for r in runs]

    def latency(ax: Any) -> None:
        for key in ("p50", "p90", "p95", "p99"):
            ax.plot(x, [r["latency_ms"][key] or float("nan") for r in runs], "o-", label=key)
        ax.axhline(report["slo"]["p95_ms"], color="red", linestyle="--", label="SLO p95")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title("Latency percentiles vs offered load")
        ax.legend(fontsize=8)

    def throughput(ax: Any) -> None:
        ax.plot(x, [r["throughput_rps"] for r in runs], "o-", label="throughput (all answers)")
        ax.plot(x, [r["goodput_rps"] for r in runs], "s-", label="goodput (answers in time)")
        ax.plot(x, x, color="#888", linestyle=":", label="offered")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("answers/s")
        ax.set_title("Throughput and goodput vs offered load")
        ax.legend(fontsize=8)

    def cost(ax: Any) -> None:
        plan = report["capacity_plan"]
        if plan["feasible"]:
            c = plan["cost_per_1k_usd"]
            ax.bar(["hybrid: SLM", "hybrid: Claude"], [c["slm"], c["claude"]], color="#1f77b4")
            ax.bar(["all-Claude"], [c["all_claude"]], color="#d62728")
            ax.set_title(f"Cost per 1,000 requests (x{c['all_claude_over_hybrid']})")
        else:
            ax.text(0.5, 0.5, "no rate met the SLO", ha="center", va="center")
            ax.set_title("Cost per 1,000 requests")
        ax.set_ylabel("USD")

    return {
        "latency_vs_load.png": latency,
        "throughput_vs_load.png": throughput,
        "cost_per_1k.png": cost,
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--url", required=True, help="the endpoint, e.g. http://127.0.0.1:8000")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    how.add_argument("--concurrency", type=int, help="closed loop: clients in parallel")
    how.add_argument(
        "--sweep", help="open loop at each rate, e.g. 0.5,1,2,4 (goodput past saturation too)"
    )
    ap.add_argument("--duration", type=float, required=True, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds sent but not counted")
    ap.add_argument("--max-requests", type=int, help="stop after this many requests per run")
    ap.add_argument("--queries", help="JSONL: {query, mode?, ...}; default: ../shared/data mix")
    ap.add_argument(
        "--stream", action="store_true", help="SSE requests; measures time to first token"
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    ap.add_argument(
        "--deadline",
        type=float,
        help="each request's deadline in seconds (X-Request-Timeout); goodput counts the "
        "answers inside it (default: the server's, 60 s)",
    )
    ap.add_argument(
        "--priority", choices=["interactive", "batch"], help="sent as X-Priority (batch yields)"
    )
    ap.add_argument(
        "--batch-share",
        type=float,
        default=0.0,
        help="send this share of the requests (0-1, drawn at random) as X-Priority: batch and "
        "the rest as interactive; goodput is reported per class",
    )
    ap.add_argument("--api-key", help="bearer key (default: $HYBRID_SERVE_API_KEY)")
    ap.add_argument(
        "--use-cache",
        action="store_true",
        help="let repeated queries be served from the answer cache (default: every request is "
        "answered afresh, Cache-Control: no-cache, so the run measures capacity)",
    )
    ap.add_argument("--slo-p95-ms", type=float, default=5000.0)
    ap.add_argument("--max-error-rate", type=float, default=0.01)
    ap.add_argument("--target-rps", type=float, default=10.0, help="capacity plan: peak rate")
    ap.add_argument("--headroom", type=float, default=0.3, help="capacity plan: spare fraction")
    ap.add_argument("--slm-replicas", type=int, default=1, help="SLM replicas of the target")
    ap.add_argument("--gpus-per-replica", type=float, default=1.0)
    ap.add_argument("--gpu-hour-usd", type=float, default=1.20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder for report.json, report.md and PNGs")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import os

    queries = load_queries(args.queries, seed=args.seed)
    api_key = args.api_key or os.environ.get("HYBRID_SERVE_API_KEY")
    progress = Progress("load")

    def spec(rate: float | None) -> RunSpec:
        return RunSpec(
            url=args.url,
            duration=args.duration,
            rate=rate,
            concurrency=args.concurrency,
            warmup=args.warmup,
            max_requests=args.max_requests,
            stream=args.stream,
            timeout=args.timeout,
            api_key=api_key,
            seed=args.seed,
            use_cache=args.use_cache,
            deadline_s=args.deadline,
            priority=args.priority,
            batch_share=args.batch_share,
        )

    def measure(rate: float | None) -> dict[str, Any]:
        s = spec(rate)
        replica: dict[str, Any] = {}
        results = asyncio.run(run_load(s, queries, progress, replica))
        return summarize(results, s, args.slo_p95_ms, args.max_error_rate, replica)

    assumptions = CostAssumptions(
        target_rps=args.target_rps,
        headroom=args.headroom,
        slm_replicas_measured=args.slm_replicas,
        gpus_per_replica=args.gpus_per_replica,
        gpu_hour_usd=args.gpu_hour_usd,
    )
    if args.sweep:
        runs = []
        for rate in sorted(float(r) for r in args.sweep.split(",")):
            progress.say(f"offered {rate} rps")
            runs.append(measure(rate))
        passing = [r for r in runs if r["slo"]["met"]]
        best = max(passing, key=lambda r: r["throughput_rps"]) if passing else runs[-1]
        report = {**best, "runs": runs}
        report["saturation_rps"] = max((r["offered_rps"] for r in passing), default=None)
    else:
        report = measure(args.rate)
    progress.done()
    report["url"] = args.url
    report["queries"] = args.queries or "default mix"
    report["capacity_plan"] = capacity_plan(report, assumptions)
    publish(Path(args.out), report, markdown(report), plots(report))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    report = run(ap.parse_args(argv))
    return 0 if report["requests"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
