"""The engine interface every SLM engine implements, and the warm-up that proves one works.

An engine is chosen by `slm.engine`: a built-in name (`llama_cpp`, `openai`) or the import path
of a class (`package.module:Class`) implementing `Engine`, as vLLM and Ray resolve their plugins.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from hybrid_serve.config import SLMConfig
from hybrid_serve.schemas import GenerationRequest, GenerationResult

BUILTIN_ENGINES = {
    "llama_cpp": "hybrid_serve.engines.llama_cpp:LlamaCppEngine",
    "openai": "hybrid_serve.engines.openai_compat:OpenAICompatEngine",
}

# A warm-up asks for a few tokens: enough to run every kernel a real request runs (prompt
# processing in batches, then token-by-token decoding), short enough to add little to start-up.
WARMUP_REQUEST = GenerationRequest(
    messages=[
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What colour is the sky on a clear day?"},
    ],
    max_tokens=8,
    temperature=0.0,
)


@runtime_checkable
class Engine(Protocol):
    """What the SLM deployment needs of an engine."""

    model_name: str

    @classmethod
    def from_config(cls, cfg: SLMConfig, replicas_on_node: int = 1) -> Engine: ...

    async def generate(self, req: GenerationRequest) -> GenerationResult: ...

    def stream(self, req: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        """Text deltas, then the GenerationResult; closing the iterator stops generation."""
        ...

    def info(self) -> dict[str, Any]:
        """Static facts and live load for `/readyz`: at least `contexts` and `in_flight`."""
        ...


async def collect(stream: AsyncIterator[str | GenerationResult]) -> GenerationResult:
    """The result a stream (`Engine.stream`) ends with: `generate` for an engine that only
    streams, or that must read its text as it comes."""
    async for item in stream:
        if isinstance(item, GenerationResult):
            return item
    raise RuntimeError("generation ended without a result")


class EngineFailed(RuntimeError):
    """The engine cannot generate: raised by the warm-up so the replica never reports ready."""


def engine_class(spec: str) -> type[Engine]:
    """The class a `slm.engine` value names."""
    path = BUILTIN_ENGINES.get(spec, spec)
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"unknown SLM engine {spec!r}: use one of {', '.join(BUILTIN_ENGINES)}, vllm, or "
            "'package.module:Class'"
        )
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"SLM engine {spec!r} cannot be imported: {exc}") from exc
    return cls


def make_engine(cfg: SLMConfig, replicas_on_node: int = 1) -> Engine:
    if cfg.engine == "vllm":
        raise ValueError(
            "the vllm engine is its own deployment (deployments/slm_vllm.py), not an in-process "
            "engine; deployments.app.build chooses it"
        )
    return engine_class(cfg.engine).from_config(cfg, replicas_on_node)


async def warm_up(
    generate: Any, timeout_s: float, request: GenerationRequest = WARMUP_REQUEST
) -> dict[str, Any]:
    """Run one short generation through `generate` (an engine's or a server's) and return what
    it took. A failure, a hang past `timeout_s` or an empty result raises EngineFailed; a crash of
    the native engine kills the process, which Ray reports as the replica's death."""
    started = time.perf_counter()
    try:
        result: GenerationResult = await asyncio.wait_for(generate(request), timeout_s)
    except TimeoutError as exc:
        raise EngineFailed(f"warm-up generation did not finish in {timeout_s:.0f} s") from exc
    except Exception as exc:
        raise EngineFailed(f"warm-up generation failed: {type(exc).__name__}: {exc}") from exc
    if result.completion_tokens < 1:
        raise EngineFailed("warm-up generation produced no tokens")
    return {
        "passed": True,
        "seconds": round(time.perf_counter() - started, 3),
        "completion_tokens": result.completion_tokens,
    }
