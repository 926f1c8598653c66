"""What each generation is charged of its replica's time.

An engine that batches (vLLM, an OpenAI-compatible server) runs many requests in one step, so a
request's wall time is not what it cost: 16 requests sharing 10 s of a GPU used 10 s, not 160.
`ReplicaClock` charges each request its share — while n requests run together, each is charged
1/n of the elapsed time (processor sharing: a virtual clock that advances at 1/n, as fair
queueing schedulers keep one). Summed over requests the charges equal the time the replica was
busy, exactly, whatever the overlap; an engine with one request per context (llama.cpp) is
charged its wall time, which is the same rule with n = 1.

Written here because it is a few lines of arithmetic no library offers as such.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Charge:
    """One request's running charge; `seconds` is final once its block has exited."""

    seconds: float = 0.0


class ReplicaClock:
    """Busy time of one replica, and each request's share of it (one event loop: no locks)."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self._last = now()
        self._virtual = 0.0  # seconds of one request's share, summed since start
        self.running = 0
        self.busy_seconds = 0.0  # time with at least one request running
        self.charged_seconds = 0.0  # what the finished requests were charged, summed

    def _advance(self) -> None:
        now = self._now()
        if self.running:
            elapsed = now - self._last
            self._virtual += elapsed / self.running
            self.busy_seconds += elapsed
        self._last = now

    @contextmanager
    def charging(self) -> Iterator[Charge]:
        """Counts the block as one running request; its charge is set when the block exits."""
        charge = Charge()
        self._advance()
        self.running += 1
        mark = self._virtual
        try:
            yield charge
        finally:
            self._advance()
            self.running -= 1
            charge.seconds = self._virtual - mark
            self.charged_seconds += charge.seconds

    def info(self) -> dict[str, float | int]:
        self._advance()
        return {
            "in_flight": self.running,
            "busy_seconds": round(self.busy_seconds, 3),
            "charged_seconds": round(self.charged_seconds, 3),
        }
