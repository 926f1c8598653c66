"""The `openai` engine against a real OpenAI-compatible HTTP server (the fixed-latency one the
fan-out benchmark uses), through the official `openai` client."""

import asyncio

import pytest

from hybrid_serve.benchmarks.fixed_latency_server import FixedLatencyServer
from hybrid_serve.engines.openai_compat import OpenAICompatEngine
from hybrid_serve.schemas import GenerationRequest, GenerationResult

REQ = GenerationRequest(messages=[{"role": "user", "content": "What port?"}], max_tokens=16)


@pytest.fixture(scope="module")
def server():
    with FixedLatencyServer(latency_s=0.05, reply="Port 8000 [1].") as s:
        yield s


def test_generate_returns_text_usage_and_logprobs(server):
    engine = OpenAICompatEngine(server.url, "slm")
    result = asyncio.run(engine.generate(REQ))
    assert result.text == "Port 8000 [1]." and result.finish_reason == "stop"
    assert result.completion_tokens == 3 and result.prompt_tokens == 2
    assert result.token_logprobs == [-0.05] * 3 and result.seconds > 0


def test_stream_yields_deltas_then_the_result(server):
    engine = OpenAICompatEngine(server.url, "slm")

    async def collect():
        return [x async for x in engine.stream(REQ)]

    items = asyncio.run(collect())
    assert isinstance(items[-1], GenerationResult)
    assert "".join(items[:-1]) == items[-1].text == "Port 8000 [1]."
    assert len(items[-1].token_logprobs) == 3 and items[-1].completion_tokens == 3


def test_replica_concurrency_is_bounded_by_contexts(server):
    engine = OpenAICompatEngine(server.url, "slm", contexts=2)
    server.max_in_flight = 0

    async def many():
        return await asyncio.gather(*(engine.generate(REQ) for _ in range(6)))

    results = asyncio.run(many())
    assert len(results) == 6 and server.max_in_flight == 2 and engine.clock.running == 0


def test_server_errors_surface_as_exceptions():
    import openai

    engine = OpenAICompatEngine("http://127.0.0.1:9/v1", "slm", max_retries=0, timeout_s=2)
    with pytest.raises(openai.APIConnectionError):
        asyncio.run(engine.generate(REQ))
