"""The `openai` engine: an OpenAI-compatible server the user already runs (vLLM, llama.cpp server,
Ollama) behind the SLM deployment, with the same interface as the in-process engines.

The replica bounds its own concurrency (`contexts`) so that Serve's routing sees the replica's real
capacity instead of pushing every request through to the server's queue.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from hybrid_serve.config import SLMConfig
from hybrid_serve.engines.base import collect
from hybrid_serve.engines.chat_wire import (
    StreamTally,
    chat_params,
    completion_result,
    stream_options,
    text_watched,
)
from hybrid_serve.engines.replica_time import ReplicaClock
from hybrid_serve.schemas import GenerationRequest, GenerationResult


class OpenAICompatEngine:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        contexts: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        logprobs: bool = True,
        vllm_extensions: bool = False,
    ) -> None:
        self.base_url = base_url
        self.model_name = model
        self.logprobs = logprobs
        self.vllm_extensions = vllm_extensions
        self._api_key = api_key or "unused"  # local servers accept any key; the SDK needs one
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._contexts = contexts
        self.clock = ReplicaClock()
        # Bound to the loop of first use: a replica serves from one loop.
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None

    @classmethod
    def from_config(cls, cfg: SLMConfig, replicas_on_node: int = 1) -> OpenAICompatEngine:
        """The key comes from the environment variable the configuration names."""
        o = cfg.openai
        return cls(
            o.base_url,
            o.model or cfg.model_name,
            api_key=os.environ.get(o.api_key_env),
            contexts=cfg.contexts_per_replica,
            timeout_s=o.timeout_s,
            max_retries=o.max_retries,
            logprobs=o.logprobs,
            vllm_extensions=o.vllm_extensions,
        )

    @property
    def contexts(self) -> int:
        return self._contexts

    def info(self) -> dict[str, Any]:
        return {"contexts": self._contexts, **self.clock.info(), "server": self.base_url}

    def _ready(self) -> tuple[Any, asyncio.Semaphore]:
        if self._client is None:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._api_key,
                timeout=self._timeout_s,
                max_retries=self._max_retries,
            )
            self._slots = asyncio.Semaphore(self._contexts)
        assert self._slots is not None
        return self._client, self._slots

    def _params(self, req: GenerationRequest) -> dict[str, Any]:
        """The SDK's parameters; vLLM's own go in the request body as the SDK's `extra_body`."""
        params = chat_params(
            self.model_name, req, logprobs=self.logprobs, vllm_extensions=self.vllm_extensions
        )
        if "repetition_detection" in params:
            params["extra_body"] = {"repetition_detection": params.pop("repetition_detection")}
        return params

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        """Yield text deltas, then the GenerationResult. Closing the iterator closes the HTTP
        stream, which a vLLM or llama.cpp server takes as the request's cancellation."""
        client, slots = self._ready()
        async with slots:
            tally = StreamTally.of(self.model_name, req, self.vllm_extensions)
            with self.clock.charging() as charge:
                stream = await client.chat.completions.create(
                    **self._params(req),
                    stream=True,
                    stream_options=stream_options(req, self.vllm_extensions),
                )
                try:
                    async for chunk in stream:
                        if out := tally.chunk(chunk):
                            yield out
                        if tally.stopped:
                            break  # closing the stream cancels the request
                finally:
                    await stream.close()
        yield tally.result().model_copy(update={"replica_seconds": charge.seconds})

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        if text_watched(req, self.vllm_extensions):
            return await collect(self.stream(req))  # the text is read as it is written
        client, slots = self._ready()
        async with slots:
            start = time.perf_counter()
            with self.clock.charging() as charge:
                response = await client.chat.completions.create(**self._params(req))
        result = completion_result(response, response.model or self.model_name, start)
        return result.model_copy(update={"replica_seconds": charge.seconds})
