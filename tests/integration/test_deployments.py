"""Deployments through real Serve handles on the shared cluster."""

import asyncio

import pytest
from ray import serve

from hybrid_serve.schemas import GenerationRequest, GenerationResult
from tests.conftest import APP

pytestmark = pytest.mark.integration


def ask(text: str, max_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], max_tokens=max_tokens)


PROMPTS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 plus 2?",
    "Say hello in Spanish.",
]


def test_slm_concurrent_requests_match_sequential(app):
    slm = serve.get_deployment_handle("SLM", app_name=APP)

    async def run():
        sequential = [await slm.generate.remote(ask(p)) for p in PROMPTS]
        concurrent = await asyncio.gather(*(slm.generate.remote(ask(p)) for p in PROMPTS))
        return sequential, concurrent

    sequential, concurrent = asyncio.run(run())
    # Greedy decoding: a context shared between requests would garble or swap these.
    assert [r.text for r in concurrent] == [r.text for r in sequential]
    assert len({r.text for r in sequential}) == len(PROMPTS)
    for r in concurrent:
        assert r.prompt_tokens > 5 and 0 < r.completion_tokens <= 24
        assert len(r.token_logprobs) == r.completion_tokens
        assert all(lp <= 0 for lp in r.token_logprobs)


def test_slm_streams_deltas_that_add_up(app):
    slm = serve.get_deployment_handle("SLM", app_name=APP).options(stream=True)

    async def run():
        items = [x async for x in slm.generate_stream.remote(ask(PROMPTS[0], 32))]
        return items

    items = asyncio.run(run())
    deltas, result = items[:-1], items[-1]
    assert isinstance(result, GenerationResult)
    assert len(deltas) >= 2 and all(isinstance(d, str) for d in deltas)
    assert "".join(deltas) == result.text


def test_slm_event_loop_stays_free_during_generation(app):
    slm = serve.get_deployment_handle("SLM", app_name=APP)

    async def run():
        long = asyncio.ensure_future(
            slm.generate.remote(ask("Write a long story about a cat.", 200))
        )
        await asyncio.sleep(0.3)
        status = await slm.status.remote()
        still_running = not long.done()
        result = await long
        return status, still_running, result

    status, still_running, result = asyncio.run(run())
    assert still_running, "generation finished before the status call; make it longer"
    assert status["ready"] and status["in_flight"] == 1
    assert result.completion_tokens > 50


def test_retriever_search_and_status(app):
    retriever = serve.get_deployment_handle("Retriever", app_name=APP)
    hits = retriever.search.remote("How do I add documents to the index?", 3).result()
    assert len(hits) == 3
    assert hits[0].doc_id == "sample:03-documents.md"
    assert hits[0].score >= hits[1].score >= hits[2].score
    status = retriever.status.remote().result()
    assert status["ready"] and status["documents"] >= 8 and status["version"] >= 1
