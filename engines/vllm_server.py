"""The `vllm` engine: `ray.serve.llm`'s LLMServer (vLLM with continuous batching; one GPU per
replica, or a placement group for tensor parallelism) with the SLM interface the orchestrator uses
for every engine: `generate`, `generate_stream`, `status`.

Imported only when `slm.engine` is `vllm`: `ray.serve.llm` needs vLLM, which CPU installs lack.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import SpanKind
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.openai_api_models import ChatCompletionRequest, ErrorResponse

from agents import tracing
from agents.schemas import GenerationRequest, GenerationResult
from agents.tracing import TraceContext
from cluster.config import HybridServeConfig
from deployments.placement import placement
from deployments.slm import generation_attributes, record_generation
from engines.base import warm_up
from engines.chat_wire import StreamTally, chat_params, completion_result
from engines.vllm_options import WARMUP_TIMEOUT_ENV, llm_config_kwargs


class VLLMEngineError(RuntimeError):
    pass


def _chat_request(model: str, req: GenerationRequest, stream: bool) -> ChatCompletionRequest:
    params = chat_params(model, req)
    if stream:
        params.update(stream=True, stream_options={"include_usage": True})
    return ChatCompletionRequest(**params)


class HybridLLMServer(LLMServer):
    """LLMServer plus the engine-neutral SLM methods, ready only after a warm-up generation."""

    warmup: dict[str, Any] | None = None

    async def start(self) -> None:
        await super().start()
        # LLMServer is built from an LLMConfig alone: the setting comes by its environment.
        timeout = float(os.environ.get(WARMUP_TIMEOUT_ENV, "180"))
        self.warmup = await warm_up(self.generate, timeout)

    @property
    def _model_id(self) -> str:
        return self._llm_config.model_loading_config.model_id

    def _attributes(self, request: GenerationRequest) -> dict[str, Any]:
        tracing.setup("SLM")  # once per replica; settings by env (see llm_config_kwargs)
        return generation_attributes("vllm", self._model_id, request)

    async def generate(
        self, request: GenerationRequest, trace_context: TraceContext = None
    ) -> GenerationResult:
        attributes = self._attributes(request)
        with tracing.span("SLM.generate", trace_context, SpanKind.SERVER, attributes):
            start = time.perf_counter()
            response: Any = None
            chat = _chat_request(self._model_id, request, stream=False)
            async for item in await self.chat(chat):
                response = item
            if response is None or isinstance(response, ErrorResponse):
                error = getattr(getattr(response, "error", None), "message", "no output")
                raise VLLMEngineError(error)
            result = completion_result(response, self._model_id, start)
            record_generation(result)
            return result

    async def generate_stream(
        self, request: GenerationRequest, trace_context: TraceContext = None
    ) -> AsyncIterator[str | GenerationResult]:
        """Text deltas, then the GenerationResult (call with `handle.options(stream=True)`)."""
        attributes = {**self._attributes(request), "hybrid.stream": True}
        with tracing.span("SLM.generate_stream", trace_context, SpanKind.SERVER, attributes):
            async for item in self._stream(request):
                if isinstance(item, GenerationResult):
                    record_generation(item)
                yield item

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        tally = StreamTally(self._model_id)
        stream = await self.chat(_chat_request(self._model_id, request, stream=True))
        async for batch in stream:
            for item in batch if isinstance(batch, list) else [batch]:
                if isinstance(item, ErrorResponse):
                    raise VLLMEngineError(item.error.message)
                for line in str(item).splitlines():
                    if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                        continue
                    data = json.loads(line[len("data: ") :])
                    if "error" in data:
                        raise VLLMEngineError(str(data["error"]))
                    if data.get("usage"):
                        u = data["usage"]
                        tally.usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
                    for choice in data.get("choices", []):
                        content = (choice.get("logprobs") or {}).get("content") or []
                        delta = (choice.get("delta") or {}).get("content")
                        tally.choice(
                            delta,
                            [float(t["logprob"]) for t in content],
                            choice.get("finish_reason"),
                        )
                        if delta:
                            yield delta
        yield tally.result()

    async def status(self) -> dict[str, Any]:
        return {
            "ready": True,
            "engine": "vllm",
            "model": self._model_id,
            "placement": placement(),
            "warmup": self.warmup,
        }


def build_vllm_slm(cfg: HybridServeConfig) -> Application:
    """The SLM deployment for the `vllm` engine, named `SLM:<model>`."""
    llm_config = LLMConfig(**llm_config_kwargs(cfg))
    return build_llm_deployment(llm_config, name_prefix="SLM:", deployment_cls=HybridLLMServer)
