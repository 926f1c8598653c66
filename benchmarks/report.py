"""Shared by every benchmark: a private Ray cluster, percentiles, a progress line, and JSON +
Markdown + PNG output."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in 0..100."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def start_private_ray(num_cpus: int, serve_port: int | None = None) -> None:
    """A new local Ray cluster of `num_cpus` logical CPUs for one benchmark run (never one that
    is running here), with Serve's HTTP proxy on `serve_port` when given. Benchmarks measure the
    local path: a Claude key in the environment is dropped so no run bills the API."""
    import ray
    from ray import serve

    os.environ.pop("ANTHROPIC_API_KEY", None)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    if serve_port is not None:
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})


# Benchmarks repeat their questions (rounds, configurations, modes): each must be answered
# afresh, not from the answer cache, or they would measure the cache.
NO_CACHE = {"cache-control": "no-cache"}


def require_plotting() -> None:
    """Fail before measuring, not after: every report is written with its plots."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError(
            "benchmarks write plots with matplotlib: pip install 'hybrid-serve[bench]'"
        )


class Progress:
    """One self-overwriting line on a terminal. Off a terminal (CI logs, files), step lines are
    printed every `interval_s` seconds, at the last step and when the phase changes, not once
    per step: thousands of per-question lines bury the rest of a log. Every benchmark starts
    with one, so it is also where a missing plotting library is caught."""

    def __init__(self, name: str, interval_s: float = 5.0) -> None:
        require_plotting()
        self.name = name
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.interval_s = interval_s
        self._last_line = -math.inf
        self._last_what = ""

    def say(self, text: str) -> None:
        now = time.monotonic()
        line = f"[{self.name} {now - self.started:6.1f}s] {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self._last_line = now

    def step(self, done: int, total: int, what: str) -> None:
        due = time.monotonic() - self._last_line >= self.interval_s
        if self.tty or due or done >= total or what != self._last_what:
            self.say(f"{what}: {done}/{total}")
        self._last_what = what

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        self.say("done")


def write_report(
    out: Path,
    report: dict[str, Any],
    markdown: str,
    plots: Mapping[str, Callable[[Any], None]],
) -> Path:
    """report.json, report.md and one PNG per plot function (given a matplotlib Axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    images = []
    for name, draw in plots.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
        draw(ax)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        images.append(f"![{name}]({name})")
    (out / "report.md").write_text(markdown.rstrip() + "\n\n" + "\n".join(images) + "\n")
    return out


def publish(
    out: Path,
    report: dict[str, Any],
    markdown: str,
    plots: Mapping[str, Callable[[Any], None]],
) -> Path:
    """`write_report`, then the Markdown and where it went on stdout."""
    path = write_report(out, report, markdown, plots)
    print(markdown)
    print(f"wrote {path}")
    return path
