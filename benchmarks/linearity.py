"""Every function that reads user or document text, on adversarial inputs at 1x and 4x the
largest the API lets reach it: the 4x/1x time ratio (linear: about 4; quadratic: about 16).

`tests/unit/test_linearity.py` runs the same cases at 1x with a bound 100x above a linear pass,
so a quadratic regression fails CI while machine noise cannot. Writes report.json, report.md and
ratios.png to --out.

    python -m hybrid_serve.benchmarks.linearity --out bench-out/linearity
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybrid_serve.agents import citations, confidence, pii, planner, prompts
from hybrid_serve.benchmarks.report import Progress, write_report
from hybrid_serve.config import HTTPConfig, SLMConfig
from hybrid_serve.engines.text_stops import TextStops
from hybrid_serve.schemas import GenerationRequest, Passage
from hybrid_serve.text import claims, split_sentences

# The largest text each kind of input can be: a query (and each chat message) is held to
# http.max_query_chars; an answer to max_tokens_ceiling tokens (at most ~8 characters each); a
# passage is a chunk, cut to this many characters at indexing.
QUERY_CHARS = HTTPConfig().max_query_chars
TEXT_CHARS = 8 * HTTPConfig().max_tokens_ceiling

# Shapes that make backtracking regexes and per-token rescans slow: long runs without a
# space, separators the planner's rules look for, digits the PII patterns try, citation
# markers and headers the echo filter holds back, and a restated prompt with no answer.
INPUTS: dict[str, Callable[[int], str]] = {
    "words": lambda n: ("alpha beta " * n)[:n],
    "no_space": lambda n: "a" * n,
    "commas_or": lambda n: ("q, a or b, " * n)[: n - 2] + "?x",
    "who_or": lambda n: ("who is the A " + "A or B " * n)[: n - 2] + "?x",
    "both_and": lambda n: ("are " + "a and b " * n)[: n - 7] + " both?x",
    "digits": lambda n: ("1 2-3 (4) " * n)[:n],
    "dots": lambda n: ("a. " * n)[:n],
    "emails": lambda n: ("a.b@c." * n)[:n],
    "markers": lambda n: ("[1] (Passage title " * n)[:n],
    "restated": lambda n: ("Question: " + "why " * n)[:n],
}

_TITLES = [
    Passage(chunk_id=f"t#{i}", doc_id="t", title=f"Passage title number {i}", text="x")
    for i in range(50)
]


def _passage(text: str) -> list[Passage]:
    return [Passage(chunk_id="d#0", doc_id="d", title="d", text=text)]


def _echo_filter(text: str) -> None:
    """Streamed as a model writes: a few characters a token."""
    echo = prompts.EchoFilter(_TITLES)
    for i in range(0, len(text), 4):
        echo.push(text[i : i + 4])
    echo.flush()


def _text_stops(text: str) -> None:
    """An answer read as it is written against eight passages made of the same text, with the
    configured stops, until one ends it as it ends generation (text that loops ends at once:
    the work that matters is the set-up over the passages and the text before a stop)."""
    slm = SLMConfig()
    stops = TextStops(
        GenerationRequest(
            messages=[],
            evidence=[text[i:] + text[:i] for i in range(8)],
            max_recited_words=slm.max_recited_words,
            repetition_detection=slm.repetition_detection,
        )
    )
    for i in range(0, len(text), 4):
        if stops.push(text[i : i + 4]):
            return


# name -> (function of one text, the largest text it sees)
CASES: dict[str, tuple[Callable[[str], Any], int]] = {
    "planner": (planner.local_plan, QUERY_CHARS),
    "query_shape": (confidence.query_shape, QUERY_CHARS),
    "pii": (lambda s: pii.Redactor().redact(s), TEXT_CHARS),
    "sentences": (split_sentences, TEXT_CHARS),
    "claims": (claims, TEXT_CHARS),
    "citations": (lambda s: citations.attribute(s, _passage(s)), TEXT_CHARS),
    "confidence": (lambda s: confidence.copied_share(s, _passage(s)), TEXT_CHARS),
    "echo_filter": (_echo_filter, TEXT_CHARS),
    "text_stops": (_text_stops, TEXT_CHARS),
    "prompt": (lambda s: prompts.answer_messages(s, _passage(s) * 8), TEXT_CHARS),
}


def seconds(f: Callable[[str], Any], text: str, repeat: int = 3) -> float:
    """Best of `repeat`: the least disturbed run on a shared machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        f(text)
        best = min(best, time.perf_counter() - start)
    return best


def linear_pass(text: str) -> int:
    """The reference: one Python step per character, the simplest linear work on the text."""
    n = 0
    for ch in text:
        n += ch.isalnum()
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench-out/linearity")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    progress = Progress("linearity")
    total = len(CASES) * len(INPUTS)
    for name, (f, size) in CASES.items():
        for shape, make in INPUTS.items():
            one, four = make(size), make(4 * size)
            t1, t4 = seconds(f, one, args.repeat), seconds(f, four, args.repeat)
            ref = seconds(linear_pass, one, args.repeat)
            rows.append(
                {
                    "function": name,
                    "input": shape,
                    "chars": size,
                    "seconds_1x": t1,
                    "seconds_4x": t4,
                    "ratio_4x": t4 / t1 if t1 else None,
                    "vs_linear_pass": t1 / ref if ref else None,
                }
            )
            progress.step(len(rows), total, name)
    progress.done()
    worst = max(rows, key=lambda r: r["ratio_4x"] or 0)
    lines = [
        "# Linearity on adversarial inputs",
        "",
        "Time at 4x the largest input over time at 1x (linear: ~4, quadratic: ~16), and time at "
        "1x over one Python step per character (the test's bound is 100).",
        "",
        "| function | input | chars | 1x ms | 4x ms | 4x/1x | 1x / linear pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['function']} | {r['input']} | {r['chars']} | {r['seconds_1x'] * 1e3:.2f} | "
            f"{r['seconds_4x'] * 1e3:.2f} | {r['ratio_4x']:.1f} | {r['vs_linear_pass']:.1f} |"
        )
    lines += [
        "",
        f"Worst 4x/1x ratio: {worst['ratio_4x']:.1f} ({worst['function']}, {worst['input']}).",
    ]

    def plot(ax: Any) -> None:
        names = list(CASES)
        worst_by = [max(r["ratio_4x"] for r in rows if r["function"] == n) for n in names]
        ax.bar(names, worst_by)
        ax.axhline(4, linestyle="--", color="green", label="linear")
        ax.axhline(16, linestyle="--", color="red", label="quadratic")
        ax.set_ylabel("time at 4x / time at 1x (worst input)")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()

    out = write_report(Path(args.out), {"rows": rows}, "\n".join(lines), {"ratios.png": plot})
    print(f"worst 4x/1x ratio {worst['ratio_4x']:.1f}; report in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
