"""Admission by deadline at a replica (agents.admission): what cannot finish in time is refused
at once with a Retry-After from the queue; batch work yields to interactive work and is refused
first; a waiter whose client has gone frees its place."""

import asyncio
import contextlib
import math
import time

import pytest

from hybrid_serve.agents.admission import OVERLOADED, DeadlineQueue, RecentRefusals
from hybrid_serve.agents.interfaces import Unavailable
from hybrid_serve.schemas import GenerationRequest


def req(deadline_s=None, priority="interactive", max_tokens=100):
    return GenerationRequest(
        messages=[{"role": "user", "content": "q"}],
        max_tokens=max_tokens,
        deadline=None if deadline_s is None else time.time() + deadline_s,
        priority=priority,
    )


class Replica:
    """A DeadlineQueue in front of work that takes `service_s` (real asyncio time, short)."""

    def __init__(self, slots=1, service_s=0.05):
        self.queue = DeadlineQueue(slots)
        self.service_s = service_s
        self.order: list[str] = []

    async def run(self, name, request):
        async with self.queue.slot(request):
            self.order.append(name)
            await asyncio.sleep(self.service_s)
        return name


async def measured(replica, n=3):
    for i in range(n):
        await replica.run(f"warm{i}", req())
    replica.order.clear()


def test_nothing_is_refused_on_arrival_before_anything_was_measured():
    async def go():
        replica = Replica(slots=3)
        return await asyncio.gather(*(replica.run(i, req(deadline_s=0.001)) for i in range(3)))

    assert asyncio.run(go()) == [0, 1, 2]


def test_a_waiter_whose_deadline_ran_out_is_refused_not_run():
    async def go():
        replica = Replica(service_s=0.05)
        running = asyncio.create_task(replica.run("running", req()))
        await asyncio.sleep(0)
        late = asyncio.create_task(replica.run("late", req(deadline_s=0.01)))
        results = await asyncio.gather(running, late, return_exceptions=True)
        return results, replica.order

    results, order = asyncio.run(go())
    assert isinstance(results[1], Unavailable) and order == ["running"]


def test_what_cannot_finish_in_time_is_refused_at_once_with_retry_after():
    async def go():
        replica = Replica(service_s=0.2)
        await measured(replica)
        busy = [asyncio.create_task(replica.run(f"b{i}", req())) for i in range(3)]
        await asyncio.sleep(0.01)  # one running, two waiting: ~0.5 s before a new one starts
        with pytest.raises(Unavailable) as refused:
            await replica.run("late", req(deadline_s=0.3))
        started_meanwhile = list(replica.order)
        fits = await replica.run("fits", req(deadline_s=5.0))
        await asyncio.gather(*busy)
        return refused.value, started_meanwhile, fits, replica.queue

    refused, started_meanwhile, fits, queue = asyncio.run(go())
    assert refused.reason == "overloaded" and refused.retry_after_s >= 1
    assert "after its deadline" in refused.detail
    assert started_meanwhile == ["b0"]  # refused on arrival, not after waiting its turn
    assert fits == "fits" and queue.refused == {"interactive": 1, "batch": 0}


def test_the_wait_counts_what_the_running_request_has_left_not_half_of_it():
    """Just after a request started, a slot frees in its whole service time: a request that
    would need 0.2 + 0.2 s is refused with 0.33 s left (counting the running one at half its
    time, it was admitted and finished late); near its end, one with 0.3 s left is admitted."""

    async def go():
        replica = Replica(service_s=0.2)
        await measured(replica)
        running = asyncio.create_task(replica.run("running", req()))
        await asyncio.sleep(0.005)
        with pytest.raises(Unavailable) as early:
            await replica.run("early", req(deadline_s=0.33))
        await asyncio.sleep(0.17)
        late = await replica.run("late", req(deadline_s=0.3))
        await running
        return early.value, late

    early, late = asyncio.run(go())
    assert early.reason == OVERLOADED and early.expected_s > 0.33
    assert late == "late"


def test_interactive_work_goes_before_batch_work_that_waits():
    async def go():
        replica = Replica(service_s=0.02)
        first = asyncio.create_task(replica.run("running", req()))
        await asyncio.sleep(0)
        batch = [
            asyncio.create_task(replica.run(f"batch{i}", req(priority="batch"))) for i in range(3)
        ]
        await asyncio.sleep(0)
        urgent = asyncio.create_task(replica.run("interactive", req()))
        await asyncio.gather(first, urgent, *batch)
        return replica.order

    order = asyncio.run(go())
    assert order[:2] == ["running", "interactive"]
    assert order[2:] == ["batch0", "batch1", "batch2"]  # in arrival order among themselves


def test_batch_work_is_refused_first_when_interactive_work_arrives():
    async def go():
        replica = Replica(service_s=0.1)
        await measured(replica)
        running = asyncio.create_task(replica.run("running", req()))
        await asyncio.sleep(0)
        batch = asyncio.create_task(replica.run("batch", req(deadline_s=0.35, priority="batch")))
        await asyncio.sleep(0)
        urgent = [asyncio.create_task(replica.run(f"i{i}", req(deadline_s=5))) for i in range(3)]
        results = await asyncio.gather(running, batch, *urgent, return_exceptions=True)
        return results, replica.queue

    results, queue = asyncio.run(go())
    assert isinstance(results[1], Unavailable)  # its deadline can no longer be met behind them
    assert results[2:] == ["i0", "i1", "i2"]
    assert queue.refused == {"interactive": 0, "batch": 1} and queue.info()["waiting"] == 0


class Clocked:
    """A one-slot DeadlineQueue on a hand-moved clock: requests of 1 s, a 10-s load window."""

    def __init__(self):
        self.clock = [0.0]
        self.queue = DeadlineQueue(1, now=lambda: self.clock[0], load_window_s=10.0)

    async def serve(self, n, every_s, priority="interactive"):
        """`n` requests one after another, one every `every_s`, each 1 s long."""
        for _ in range(n):
            async with self.queue.slot(req(priority=priority)):
                self.clock[0] += 1.0
            self.clock[0] += every_s - 1.0


def test_batch_work_is_refused_at_once_when_interactive_work_will_overtake_it_past_its_deadline():
    """One interactive request a second claims half of the slot: a batch request behind 1 s
    of work waits 2 s, not 1 (what arrives meanwhile goes first), so with 2.5 s left it is
    refused at once; with 3.5 s it is admitted. Interactive work is not stretched."""

    async def go():
        replica = Clocked()
        await replica.serve(5, every_s=2.0)  # 5 s of interactive work in the 10-s window
        load = replica.queue.interactive_load()
        async with contextlib.AsyncExitStack() as running:
            await running.enter_async_context(replica.queue.slot(req()))
            with pytest.raises(Unavailable) as short:
                await replica.queue.slot(req(deadline_s=2.5, priority="batch")).__aenter__()
            waits = replica.queue.info()["expected_wait_s"]
            fits = asyncio.create_task(
                replica.queue.slot(req(deadline_s=3.5, priority="batch")).__aenter__()
            )
            await asyncio.sleep(0)
            admitted = not fits.done()  # waiting for the slot, not refused
            fits.cancel()
        return load, short.value, waits, admitted, replica.queue.refused

    load, short, waits, admitted, refused = asyncio.run(go())
    assert load == pytest.approx(0.5, abs=0.11)  # the 6th request (running) is counted too
    assert short.reason == OVERLOADED and short.expected_s > 2.5
    assert waits["interactive"] == pytest.approx(1.0) and waits["batch"] > 1.8
    assert admitted and refused == {"interactive": 0, "batch": 1}


def test_batch_work_waiting_is_refused_as_soon_as_interactive_work_fills_the_replica():
    """A batch request admitted while interactive work was light is refused as interactive
    arrivals (one a second, 1 s each) come to fill the slot — after a few of them, not when its
    30-s deadline has run out (the queue as it stands would have kept it for ~28); once they
    fill the slot a new one is refused on arrival however long its deadline, while interactive
    work still gets in."""

    async def go():
        replica = Clocked()
        await replica.serve(1, every_s=1.0)  # service measured, light load
        queue = replica.queue
        waiting = []
        async with contextlib.AsyncExitStack() as running:
            await running.enter_async_context(queue.slot(req()))
            batch = asyncio.create_task(
                queue.slot(req(deadline_s=30.0, priority="batch")).__aenter__()
            )
            await asyncio.sleep(0)
            assert not batch.done()  # admitted: it waits
            refused_at = None
            for _ in range(9):
                replica.clock[0] += 1.0
                waiting.append(asyncio.create_task(queue.slot(req(deadline_s=1000)).__aenter__()))
                for _ in range(3):  # the arrival, then the refused waiter's wake-up
                    await asyncio.sleep(0)
                if refused_at is None and batch.done():
                    refused_at = replica.clock[0]
            assert isinstance(batch.exception(), Unavailable)
            with pytest.raises(Unavailable) as late:
                await queue.slot(req(deadline_s=1000.0, priority="batch")).__aenter__()
            interactive = asyncio.create_task(queue.slot(req(deadline_s=1000)).__aenter__())
            await asyncio.sleep(0)
            admitted = not interactive.done()
            info = queue.info()
            for task in (*waiting, interactive):
                task.cancel()
        return refused_at, late.value, admitted, info

    refused_at, late, admitted, info = asyncio.run(go())
    assert refused_at is not None and refused_at <= 8.0
    assert math.isinf(late.expected_s) and "interactive work takes" in late.detail
    assert late.retry_after_s >= 1 and admitted
    assert info["expected_wait_s"]["batch"] is None and info["interactive_load"] >= 1


def test_a_cancelled_waiter_frees_its_place_and_a_running_one_its_slot():
    async def go():
        replica = Replica(service_s=0.05)
        running = asyncio.create_task(replica.run("running", req()))
        await asyncio.sleep(0)
        gone = asyncio.create_task(replica.run("gone", req()))
        await asyncio.sleep(0)
        gone.cancel()
        after = await replica.run("after", req())
        await running
        return replica.order, after, replica.queue.info()

    order, after, info = asyncio.run(go())
    assert order == ["running", "after"] and after == "after"
    assert info["running"] == 0 and info["waiting"] == 0


def test_service_time_is_measured_per_length():
    async def go():
        queue = DeadlineQueue(1)
        for tokens, seconds in ((32, 0.01), (200, 0.06)):
            async with queue.slot(req(max_tokens=tokens)):
                await asyncio.sleep(seconds)
        return queue

    queue = asyncio.run(go())
    assert queue.service_s(32) < queue.service_s(200)
    assert queue.service_s(400) == queue.service_s(200)  # the nearest length measured


def test_an_idle_replica_never_refuses():
    """A free slot starts the request now, whatever its estimated length (it may stop early)."""

    async def go():
        queue = DeadlineQueue(1)
        async with queue.slot(req(max_tokens=16)):
            await asyncio.sleep(0.05)
        async with queue.slot(req(deadline_s=0.001, max_tokens=16)):
            return queue.refused

    assert asyncio.run(go()) == {"interactive": 0, "batch": 0}


# -- refused on arrival, after the replica refused one like it -------------------------------


def test_a_request_right_after_a_refusal_is_refused_on_arrival_until_it_is_old():
    clock = [100.0]
    heard = []
    recent = RecentRefusals(heard_for_s=2.0, now=lambda: clock[0], on_refuse=heard.append)
    refusal = Unavailable(OVERLOADED, "at capacity", retry_after_s=40, expected_s=75.0)
    recent.heard("interactive", refusal)
    early = recent.check("interactive", left_s=60.0)
    assert early is not None and early.reason == OVERLOADED and early.retry_after_s == 40
    assert recent.check("batch", left_s=60.0) is not None  # lower priority: refused too
    assert recent.check("interactive", left_s=80.0) is None  # a longer deadline may fit
    clock[0] += 1.0
    assert recent.check("interactive", left_s=60.0) is not None  # 74 s still > 60 s
    clock[0] += 1.5  # older than heard_for_s: the replica decides again
    assert recent.check("interactive", left_s=60.0) is None
    assert heard == ["interactive", "batch", "interactive"]


def test_a_batch_refusal_says_nothing_of_interactive_work():
    recent = RecentRefusals()
    recent.heard("batch", Unavailable(OVERLOADED, "", retry_after_s=30, expected_s=90.0))
    assert recent.check("interactive", left_s=60.0) is None
    assert recent.check("batch", left_s=60.0) is not None
    recent.heard("interactive", Unavailable("replica_failed", "", 1.0))  # not an overload
    assert recent.check("interactive", left_s=60.0) is None


class BehindABusyReplica:
    """A pipeline whose SLM is a replica of one 0.3-s slot (`Replica`'s real queue) with about
    1 s of work ahead of it once `busy()` has started it; records what the pipeline searched
    and which generations reached the SLM."""

    def __init__(self, passages):
        self.passages = passages
        self.searched, self.asked_slm = [], []
        self.replica = Replica(slots=1, service_s=0.3)

    async def retrieve(self, query, top_k, collections=None):
        self.searched.append(query)
        return self.passages

    async def generate(self, request):
        from hybrid_serve.schemas import GenerationResult

        self.asked_slm.append(request)
        await self.replica.run("answer", request)
        return GenerationResult(text="Paris is in France [1].", completion_tokens=6)

    async def busy(self):
        """Measures the replica, starts three requests on it; returns them to await."""
        from hybrid_serve.agents.pipeline import Pipeline
        from hybrid_serve.config import HybridServeConfig

        await measured(self.replica, n=2)
        work = [asyncio.create_task(self.replica.run(f"busy{i}", req())) for i in range(3)]
        await asyncio.sleep(0.01)
        self.pipe = Pipeline(self.retrieve, self.generate, HybridServeConfig.load(overrides={}))
        return work

    def ask(self, query, **fields):
        """An answer request with a 0.5-s deadline."""
        from hybrid_serve.agents.context import RequestOptions
        from hybrid_serve.schemas import AnswerRequest

        body = AnswerRequest(query=query, **fields)
        return self.pipe.answer(RequestOptions(body, timeout_s=0.5), "t")


def test_the_pipeline_refuses_on_arrival_without_retrieving():
    """The SLM replica's real queue refuses a request; the next one, right after, is refused
    by the pipeline before retrieval."""
    from hybrid_serve.schemas import Passage

    at = BehindABusyReplica(
        [Passage(chunk_id="a#0", doc_id="a", title="A", text="Paris is in France.")]
    )

    async def go():
        busy = await at.busy()
        with pytest.raises(Unavailable) as first:  # ~1 s of work ahead, 0.5 s deadline
            await at.ask("first")
        with pytest.raises(Unavailable) as second:
            await at.ask("second")
        await asyncio.gather(*busy)
        return first.value, second.value

    first, second = asyncio.run(go())
    assert first.reason == second.reason == OVERLOADED
    assert at.searched == ["first"]  # the second was refused before retrieval
    assert "the SLM refused a request of priority interactive" in second.detail


def test_a_request_that_allows_it_is_answered_extractively_when_the_slm_is_at_capacity():
    """`overload: extract`: the replica's refusal becomes an answer quoted from the passages,
    cited; right after, such a request skips the SLM (retrieved, never queued), while one
    that does not allow it is still refused on arrival."""
    from hybrid_serve.schemas import Passage

    at = BehindABusyReplica(
        [
            Passage(
                chunk_id="a#0", doc_id="a", title="A", text="Lyon is large. Paris is in France."
            ),
            Passage(chunk_id="b#0", doc_id="b", title="B", text="Cheese is made from milk."),
        ]
    )

    async def go():
        busy = await at.busy()
        first = await at.ask("Where is Paris?", overload="extract", mode="slm")
        second = await at.ask("Where is Paris, again?", overload="extract", mode="slm")
        with pytest.raises(Unavailable) as third:
            await at.ask("Where is Paris, strictly?", overload="refuse", mode="slm")
        await asyncio.gather(*busy)
        return first, second, third.value

    first, second, third = asyncio.run(go())
    for answer in (first, second):
        assert answer.route == "extractive" and answer.degraded == ["slm_overloaded"]
        assert "Paris is in France" in answer.answer and "Lyon" not in answer.answer
        assert [c.doc_id for c in answer.citations] == ["a"]
        assert answer.usage.slm_completion_tokens == 0
    assert len(at.asked_slm) == 1  # the first was refused by the replica; the second never asked
    assert at.searched == ["Where is Paris?", "Where is Paris, again?"]
    assert third.reason == OVERLOADED


def test_the_wait_is_when_a_slot_frees_even_after_the_slots_were_cut():
    """Two running (1 s each, started at 0 and 0.5): at 0.6 a slot frees in 0.4 s; resized to
    one slot, only when both have ended (0.9 s)."""
    import contextlib

    clock = [0.0]
    queue = DeadlineQueue(2, now=lambda: clock[0])

    async def go():
        async with queue.slot(req()):
            clock[0] += 1.0  # measured: 1 s for this length
        async with contextlib.AsyncExitStack() as held:
            clock[0] = 10.0
            await held.enter_async_context(queue.slot(req()))
            clock[0] = 10.5
            await held.enter_async_context(queue.slot(req()))
            clock[0] = 10.6
            both = queue.expected_wait_s()
            queue.resize(1)
            return both, queue.expected_wait_s()

    both, one = asyncio.run(go())
    assert both == pytest.approx(0.4) and one == pytest.approx(0.9)
