"""What turning llama.cpp's extra buffer types off costs: tokens/s with `slm.llama_cpp.
extra_buffers` on vs off, on the same model and prompt, interleaved round by round in one process
(so the ratio holds on a noisy machine). Run it on a CPU where llama.cpp's default does not crash.

The bundled model is Q4_1, which llama.cpp's CPU repacking does not cover on x86; `--quant q4_0`
also measures a Q4_0 copy of it (requantized once into --out), a type that is repacked, to show
the cost for GGUFs that benefit.

    python -m hybrid_serve.benchmarks.extra_buffers --rounds 5 --quant q4_0 \
        --out bench-out/extra_buffers
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from hybrid_serve.benchmarks.report import Progress, publish
from hybrid_serve.schemas import GenerationRequest

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short paragraph about the history of Paris. " * 8},
]


def requantize(source: Path, target: Path, kind: str) -> Path:
    """A copy of `source` in another llama.cpp quantization type (once; reused)."""
    import llama_cpp

    if target.is_file():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.allow_requantize = True
    target.parent.mkdir(parents=True, exist_ok=True)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"quantizing {source} to {kind} failed")
    return target


def measure(model: Path, rounds: int, max_tokens: int, threads: int, progress: Progress):
    from hybrid_serve.engines.llama_cpp import LlamaCppEngine

    engines = {
        setting: LlamaCppEngine(model, n_threads=threads, extra_buffers=setting)
        for setting in ("on", "off")
    }
    req = GenerationRequest(messages=PROMPT, max_tokens=max_tokens, temperature=0.0)
    for engine in engines.values():
        engine.generate_blocking(req)  # first call pays page faults and allocation
    rows: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for i in range(rounds):
        progress.step(i + 1, rounds, f"{model.name}: on/off")
        for setting, engine in engines.items():
            r = engine.generate_blocking(req)
            rows[setting].append({"tok_s": r.completion_tokens / r.seconds, "seconds": r.seconds})
    out: dict[str, Any] = {
        "model": model.name,
        "prompt_tokens": len(engines["on"].prompt_tokens(PROMPT)),
        "max_tokens": max_tokens,
    }
    for setting in ("on", "off"):
        out[f"{setting}_tok_s"] = statistics.median(x["tok_s"] for x in rows[setting])
        out[f"{setting}_request_s"] = statistics.median(x["seconds"] for x in rows[setting])
    out["off_over_on"] = out["off_tok_s"] / out["on_tok_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quant", action="append", default=[], help="also a copy in this type")
    ap.add_argument("--out", default="bench-out/extra_buffers")
    args = ap.parse_args(argv)

    import llama_cpp

    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.engines.hardware import cpu_summary

    out = Path(args.out)
    progress = Progress("extra_buffers")
    models = [bundled_gguf()]
    for kind in args.quant:
        progress.say(f"requantizing to {kind}")
        models.append(requantize(bundled_gguf(), out / f"model-{kind}.gguf", kind))
    results = [measure(m, args.rounds, args.max_tokens, args.threads, progress) for m in models]
    progress.done()
    report = {
        "cpu": cpu_summary(),
        "llama_cpp_build": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "threads": args.threads,
        "rounds": args.rounds,
        "results": results,
    }
    md = [
        "# llama.cpp extra buffer types: off vs on",
        "",
        f"CPU: {report['cpu']}; threads {args.threads}; "
        f"median of {args.rounds} interleaved rounds.",
        "",
        "| model | prompt tokens | on tok/s | off tok/s | off / on |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        md.append(
            f"| {r['model']} | {r['prompt_tokens']} | {r['on_tok_s']:.1f} | {r['off_tok_s']:.1f} "
            f"| {r['off_over_on']:.3f} |"
        )

    def plot(ax: Any) -> None:
        x = range(len(results))
        ax.bar([i - 0.2 for i in x], [r["on_tok_s"] for r in results], 0.4, label="on")
        ax.bar([i + 0.2 for i in x], [r["off_tok_s"] for r in results], 0.4, label="off")
        ax.set_xticks(list(x), [r["model"] for r in results], fontsize=7)
        ax.set_ylabel("generated tokens/s")
        ax.set_title("llama.cpp extra buffer types")
        ax.legend()

    publish(out, report, "\n".join(md), {"tokens_per_s.png": plot})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
