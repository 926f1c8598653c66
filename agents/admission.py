"""Admission by deadline at a replica: a request waits for one of the replica's slots
(llama.cpp contexts, a batching engine's sequences), interactive work before batch work, and one
that cannot start and finish inside its deadline is refused at once — with how long to wait —
instead of queueing until it times out. Under overload a replica then spends its time on answers
someone will receive (goodput), not on answers whose clients have already gone.

Expected completion = the wait for a slot + its own service time. The wait: each slot frees when
its running request's expected time, less what it has run, is up; the waiters ahead of it (in
this request's priority order) take the slots as they free, each for its service time. Service
times are measured per `max_tokens` (a 48-token rewrite and a 160-token answer differ several
fold), an exponentially weighted mean of the last few. Until a length has been measured nothing
is refused on its account. Batch work also waits for the interactive work that will arrive while
it waits and go ahead of it: with interactive work claiming a share rho of the slots' time (its
arrivals over the last minute times their service times), a batch wait W stretches to
W / (1 - rho), and is unbounded once rho reaches 1 — so batch work that would only be overtaken
until its deadline runs out is refused when it arrives, not after waiting.

Written here because admission control of this kind (deadline-aware, priority-ordered, with a
queue model of the replica) is the replica's own policy; asyncio's queues have no deadlines.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from hybrid_serve.agents.interfaces import Unavailable
from hybrid_serve.schemas import PRIORITIES, Priority

# Weight of the newest measurement in the service-time mean.
EWMA_WEIGHT = 0.2
OVERLOADED = "overloaded"
# How far back interactive arrivals count towards the load that will go ahead of batch work.
LOAD_WINDOW_S = 60.0


class SlotRequest(Protocol):
    """What admission needs of a request: its length (service times are measured per length),
    what remains of its deadline, and its priority. A `GenerationRequest` is one."""

    @property
    def max_tokens(self) -> int: ...

    @property
    def deadline_s(self) -> float | None: ...

    @property
    def priority(self) -> Priority: ...


@dataclass(order=True)
class _Waiter:
    rank: tuple[int, int]  # (priority, arrival): the order slots are handed out in
    due: float = field(compare=False)  # when its deadline runs out (monotonic); inf: none
    service_s: float | None = field(compare=False)
    future: asyncio.Future[int] = field(compare=False)  # the slot's token, once handed one


@dataclass
class Refusal:
    """Why a request was refused, for metrics: the reason and its priority."""

    priority: Priority
    expected_s: float
    deadline_s: float


class DeadlineQueue:
    """Slots of one replica. `on_refuse` hears every refusal (metrics live in the deployment)."""

    def __init__(
        self,
        slots: int,
        now: Callable[[], float] = time.monotonic,
        on_refuse: Callable[[Refusal], None] | None = None,
        load_window_s: float = LOAD_WINDOW_S,
    ) -> None:
        self.slots = max(1, slots)
        self._now = now
        self._on_refuse = on_refuse
        self.load_window_s = load_window_s
        # Interactive work admitted in the last load window: (when, its expected service time).
        self._interactive: deque[tuple[float, float]] = deque()
        self._interactive_s = 0.0  # their summed service times
        self._running: dict[int, tuple[float, float]] = {}  # slot token -> started, expected
        self._tokens = itertools.count()
        self._waiting: list[_Waiter] = []  # a heap by rank
        self._arrivals = itertools.count()
        self._service: dict[int, float] = {}  # max_tokens -> mean seconds
        self.refused = {p: 0 for p in PRIORITIES}

    # -- the queue model -----------------------------------------------------------------------

    def service_s(self, max_tokens: int) -> float | None:
        """The mean service time of requests of this length, or of the nearest measured length
        (None before anything was measured). Not scaled by length: `max_tokens` is a ceiling
        most answers stop well short of, and the prompt's cost does not grow with it."""
        if max_tokens in self._service:
            return self._service[max_tokens]
        if not self._service:
            return None
        nearest = min(self._service, key=lambda n: abs(n - max_tokens))
        return self._service[nearest]

    def _free_at(self) -> list[float]:
        """When each slot frees, in seconds from now (a heap): a running request after its
        expected time less what it has run (a tenth of it at least, once overdue: it is about to
        end, but not this instant); a free slot at once."""
        now = self._now()
        frees = [
            max(expected - (now - started), expected / 10)
            for started, expected in self._running.values()
        ]
        frees += [0.0] * max(self.slots - len(frees), 0)
        frees.sort()
        # More running than slots (resized down): the first to end free no slot of their own.
        return frees[len(frees) - self.slots :]  # sorted, so a heap

    def _wait_s(self, ahead: list[_Waiter]) -> float:
        """Until a slot frees for the request behind `ahead`: the slots' free times, each
        waiter ahead taking the first to free (a walk in slot order, n log slots)."""
        frees = self._free_at()
        typical = self._typical_s()
        for waiter in sorted(ahead):
            heapq.heapreplace(frees, frees[0] + (waiter.service_s or typical))
        return frees[0]

    def _typical_s(self) -> float:
        return sum(self._service.values()) / len(self._service) if self._service else 0.0

    @property
    def running(self) -> int:
        return len(self._running)

    def interactive_load(self) -> float:
        """The share of the slots' time that arriving interactive work claims (rho): what was
        admitted in the last load window, by its service times, over the window. Until a window
        has passed it reads low, which admits as if interactive work were lighter (the wait as
        the queue stands)."""
        horizon = self._now() - self.load_window_s
        while self._interactive and self._interactive[0][0] < horizon:
            self._interactive_s -= self._interactive.popleft()[1]
        if not self._interactive:
            self._interactive_s = 0.0  # no float drift once empty
        return max(self._interactive_s, 0.0) / (self.load_window_s * self.slots)

    def _admitted(self, rank: int, service_s: float | None) -> None:
        if rank == 0:
            service = service_s or self._typical_s()
            self._interactive.append((self._now(), service))
            self._interactive_s += service

    def _overtaken(self, wait_s: float, rank: int) -> float:
        """A batch wait stretched by the interactive work that arrives meanwhile and goes ahead
        (each second of waiting brings rho seconds of it): wait / (1 - rho), unbounded once
        interactive work alone fills the slots. Interactive work is not overtaken."""
        if rank == 0 or wait_s <= 0:
            return wait_s
        rho = self.interactive_load()
        return wait_s / (1 - rho) if rho < 1 else math.inf

    def expected_wait_s(self, priority: Priority = "interactive") -> float:
        """What a request of `priority` arriving now would wait for a slot (inf: interactive
        work alone fills the replica, so batch work would wait for ever)."""
        rank = PRIORITIES.index(priority)
        return self._overtaken(self._wait_s([w for w in self._waiting if w.rank[0] <= rank]), rank)

    def _refuse(
        self, priority: Priority, expected_s: float, deadline_s: float, drain_s: float | None = None
    ) -> Unavailable:
        """The refusal; Retry-After is the time the queue needs to drain (`drain_s`, when the
        caller has it)."""
        self.refused[priority] += 1
        if self._on_refuse is not None:
            self._on_refuse(Refusal(priority, expected_s, deadline_s))
        if drain_s is None:
            drain_s = self._wait_s(list(self._waiting))
        retry = max(1.0, math.ceil(drain_s))
        if math.isinf(expected_s):
            why = (
                f"interactive work takes {self.interactive_load():.0%} of this replica, so this "
                f"{priority} request would not start before its deadline "
                f"({max(deadline_s, 0):.1f} s left)"
            )
        else:
            why = (
                f"this {priority} request would finish in about {expected_s:.1f} s, after its "
                f"deadline ({max(deadline_s, 0):.1f} s left)"
            )
        return Unavailable(
            OVERLOADED, f"at capacity: {why}; retry after {retry:g} s", retry, expected_s
        )

    # -- slots ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, request: SlotRequest) -> AsyncIterator[None]:
        """Held while the request runs; refused (Unavailable, `overloaded`) when it cannot
        finish inside `request.deadline_s`, now or by the time a slot frees."""
        arrived = self._now()
        left = math.inf if request.deadline_s is None else request.deadline_s
        service = self.service_s(request.max_tokens)
        rank = PRIORITIES.index(request.priority)
        if self.running < self.slots and not self._waiting:
            # A free slot: it starts now. Its own length is only an estimate (it may stop
            # early), so an idle replica never refuses; the deadline cuts it if need be.
            token = self._start(service)
            self._admitted(rank, service)
        else:
            ahead = [w for w in self._waiting if w.rank[0] <= rank]
            expected = self._overtaken(self._wait_s(ahead), rank) + (service or 0.0)
            if expected > left:
                raise self._refuse(request.priority, expected, left)
            self._admitted(rank, service)
            waiter = _Waiter(
                (rank, next(self._arrivals)),
                arrived + left,
                service,
                asyncio.get_running_loop().create_future(),
            )
            heapq.heappush(self._waiting, waiter)
            self._prune()  # who waits behind it may no longer make it
            try:
                token = await waiter.future  # a slot held for it, or an Unavailable
            except asyncio.CancelledError:
                if waiter.future.done() and not waiter.future.cancelled():
                    if waiter.future.exception() is None:
                        # a slot was handed over just as it was cancelled
                        self._release(waiter.future.result())
                else:
                    self._discard(waiter)
                raise
        started = self._now()
        finished = False
        try:
            yield
            finished = True
        finally:
            if finished:
                self._measure(request.max_tokens, self._now() - started)
            self._release(token)

    def _start(self, service_s: float | None) -> int:
        token = next(self._tokens)
        self._running[token] = (self._now(), service_s or self._typical_s())
        return token

    def _measure(self, max_tokens: int, seconds: float) -> None:
        old = self._service.get(max_tokens)
        new = seconds if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * seconds
        if old is None and len(self._service) >= 64:  # lengths are few; keep it bounded anyway
            self._service.pop(next(iter(self._service)))
        self._service[max_tokens] = new

    def resize(self, slots: int) -> None:
        """A new number of slots, in place: who waits keeps its place (and, with more slots,
        starts now); running work is not stopped by fewer."""
        self.slots = max(1, slots)
        self._hand_out()

    def _release(self, token: int) -> None:
        self._running.pop(token, None)
        self._hand_out()

    def _hand_out(self) -> None:
        while self._waiting and self.running < self.slots:
            waiter = heapq.heappop(self._waiting)
            if waiter.future.done():
                continue
            if self._now() > waiter.due:  # its deadline ran out while it waited
                waiter.future.set_exception(
                    self._refuse(self._priority(waiter), waiter.service_s or 0.0, 0.0)
                )
                continue
            waiter.future.set_result(self._start(waiter.service_s))
        self._prune()

    def _discard(self, waiter: _Waiter) -> None:
        try:
            self._waiting.remove(waiter)
            heapq.heapify(self._waiting)
        except ValueError:
            pass

    @staticmethod
    def _priority(waiter: _Waiter) -> Priority:
        return PRIORITIES[waiter.rank[0]]

    def _prune(self) -> None:
        """Refuse the waiters that can no longer finish in time, lowest priority first to be
        affected: a walk in slot order, n log slots."""
        if not self._waiting:
            return
        now = self._now()
        typical = self._typical_s()
        drain = self._wait_s(self._waiting)
        kept: list[_Waiter] = []
        frees = self._free_at()  # the slots as the kept waiters ahead will have taken them
        for waiter in sorted(self._waiting):
            if waiter.future.done():
                continue
            expected = self._overtaken(frees[0], waiter.rank[0]) + (waiter.service_s or 0.0)
            left = waiter.due - now
            if expected > left:
                refusal = self._refuse(self._priority(waiter), expected, left, drain)
                waiter.future.set_exception(refusal)
            else:
                kept.append(waiter)
                heapq.heapreplace(frees, frees[0] + (waiter.service_s or typical))
        self._waiting = kept  # sorted, so already a heap

    def info(self) -> dict[str, object]:
        return {
            "slots": self.slots,
            "running": self.running,
            "waiting": len(self._waiting),
            "interactive_load": round(self.interactive_load(), 3),
            # None: unbounded (interactive work alone fills the replica)
            "expected_wait_s": {
                p: None if math.isinf(wait := self.expected_wait_s(p)) else round(wait, 3)
                for p in PRIORITIES
            },
            "service_s": {str(k): round(v, 3) for k, v in sorted(self._service.items())},
            "refused": dict(self.refused),
        }


# How long a refusal speaks for the requests that arrive after it.
HEARD_FOR_S = 2.0


class RecentRefusals:
    """The SLM's refusals as a pipeline heard them, so that a request arriving just after one,
    which would be refused too, is refused on arrival — before its retrieval and its hops spend
    the CPU the replica is short of. Per priority: when, and when that request would have
    finished. A request of that priority or lower is refused if it could not finish by then
    (less the time since: the queue drains meanwhile) inside its own deadline; after
    `heard_for_s` requests go through again, and the replica's own check decides."""

    def __init__(
        self,
        heard_for_s: float = HEARD_FOR_S,
        now: Callable[[], float] = time.monotonic,
        on_refuse: Callable[[Priority], None] | None = None,
    ) -> None:
        self.heard_for_s = heard_for_s
        self._now = now
        self.on_refuse = on_refuse
        self._last: dict[Priority, tuple[float, float, float]] = {}  # at, expected, retry
        self.refused = {p: 0 for p in PRIORITIES}

    def heard(self, priority: Priority, refusal: Unavailable) -> None:
        if refusal.reason == OVERLOADED and refusal.expected_s is not None:
            retry = refusal.retry_after_s or 1.0
            self._last[priority] = (self._now(), refusal.expected_s, retry)

    def check(self, priority: Priority, left_s: float, count: bool = True) -> Unavailable | None:
        """The refusal for a request of `priority` with `left_s` of its deadline, or None;
        counted (and heard by `on_refuse`) unless `count` is False — the request takes another
        route rather than being refused."""
        now = self._now()
        rank = PRIORITIES.index(priority)
        for heard_priority, (at, expected, retry) in self._last.items():
            since = now - at
            if PRIORITIES.index(heard_priority) > rank or since > self.heard_for_s:
                continue  # a batch refusal says nothing of interactive work; or it is old
            if expected - since > left_s:
                if count:
                    self.refused[priority] += 1
                    if self.on_refuse is not None:
                        self.on_refuse(priority)
                return Unavailable(
                    OVERLOADED,
                    f"at capacity: {since:.1f} s ago the SLM refused a request of priority "
                    f"{heard_priority} that would have finished in {expected:.0f} s, after "
                    f"this one's deadline ({left_s:.0f} s); retry after "
                    f"{max(1.0, retry - since):.0f} s",
                    max(1.0, math.ceil(retry - since)),
                    expected - since,
                )
        return None
