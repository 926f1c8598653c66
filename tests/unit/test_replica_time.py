"""What a generation is charged of its replica's time: shares of a batching engine's steps sum
to the time the replica was busy, however requests overlap."""

import asyncio

import pytest

from hybrid_serve.benchmarks.fixed_latency_server import FixedLatencyServer
from hybrid_serve.engines.openai_compat import OpenAICompatEngine
from hybrid_serve.engines.replica_time import ReplicaClock
from hybrid_serve.schemas import GenerationRequest


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_overlapping_requests_share_the_time_they_ran_together():
    now = Clock()
    clock = ReplicaClock(now)
    a = clock.charging()
    first = a.__enter__()
    now.t = 2.0  # a alone for 2 s
    b = clock.charging()
    second = b.__enter__()
    now.t = 6.0  # a and b together for 4 s: 2 s each
    a.__exit__(None, None, None)
    now.t = 7.0  # b alone for 1 s
    b.__exit__(None, None, None)
    now.t = 9.0  # idle: nobody is charged
    assert first.seconds == pytest.approx(4.0) and second.seconds == pytest.approx(3.0)
    info = clock.info()
    assert info["busy_seconds"] == pytest.approx(7.0) and info["charged_seconds"] == 7.0
    assert info["in_flight"] == 0


def test_a_batching_engine_charges_each_request_its_share_not_its_wall_time():
    """16 requests of 0.3 s at once on an OpenAI-compatible server: each takes 0.3 s of wall
    time, and together they used the server's 0.3 s, not 4.8 s."""
    with FixedLatencyServer(latency_s=0.3) as server:
        engine = OpenAICompatEngine(server.url, "slm", contexts=16)
        request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=8)

        async def run():
            return await asyncio.gather(*(engine.generate(request) for _ in range(16)))

        results = asyncio.run(run())
    wall = sum(r.seconds for r in results)
    charged = sum(r.charged_seconds() for r in results)
    busy = engine.clock.info()["busy_seconds"]
    assert charged == pytest.approx(busy, rel=0.01)
    assert charged < wall / 4  # overlapping requests are not each charged the whole batch
    assert all(r.replica_seconds is not None and r.replica_seconds > 0 for r in results)
