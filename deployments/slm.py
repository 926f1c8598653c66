"""SLM deployment: one engine per replica; the same interface whatever the engine.

A replica proves its engine can generate before Serve routes anything to it: the constructor runs
a short warm-up generation, so a broken engine fails the replica's start (and `hybrid-serve up`)
instead of the first user request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry.trace import SpanKind
from ray import serve
from ray.serve import Application

from hybrid_serve.agents import tracing
from hybrid_serve.agents.admission import DeadlineQueue, Refusal
from hybrid_serve.agents.tracing import TraceContext
from hybrid_serve.config import HybridServeConfig, SLMConfig, TracingConfig
from hybrid_serve.deployments.metrics import WAIT_S, metrics
from hybrid_serve.deployments.placement import deployment, placement
from hybrid_serve.deployments.versions import versioned
from hybrid_serve.engines import Engine, make_engine, warm_up
from hybrid_serve.engines.llama_cpp import openmp_env
from hybrid_serve.engines.replica_time import ReplicaClock
from hybrid_serve.schemas import GenerationRequest, GenerationResult


def generation_attributes(engine: str, model: str, request: GenerationRequest) -> dict[str, Any]:
    """GenAI semantic conventions for one generation (no prompt text: it may be sensitive)."""
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": engine,
        "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": request.max_tokens,
        "gen_ai.request.temperature": request.temperature,
    }


def record_generation(result: GenerationResult) -> None:
    """Usage on the current span, and the SLM token metrics."""
    tok_s = result.completion_tokens / result.seconds if result.seconds > 0 else None
    tracing.annotate(
        {
            "gen_ai.response.model": result.model or None,
            "gen_ai.response.finish_reasons": [result.finish_reason],
            "gen_ai.usage.input_tokens": result.prompt_tokens,
            "gen_ai.usage.output_tokens": result.completion_tokens,
            "hybrid.slm.tokens_per_second": round(tok_s, 2) if tok_s else None,
        }
    )
    metrics.inc("hybrid_serve_slm_tokens_total", result.prompt_tokens, kind="prompt")
    metrics.inc("hybrid_serve_slm_tokens_total", result.completion_tokens, kind="completion")
    if tok_s:  # none without generation time or without completion tokens
        metrics.observe("hybrid_serve_slm_tokens_per_second", tok_s)


class ReplicaTime:
    """The replica's time spent generating (at least one generation running) against what its
    answers were charged: summed over a run, the charges should come to the busy time (the load
    report checks it), whatever the engine."""

    def __init__(self) -> None:
        self.clock = ReplicaClock()
        self.charged_s = 0.0
        self.generations = 0

    def busy(self) -> AbstractContextManager[Any]:
        return self.clock.charging()

    def charged(self, result: GenerationResult) -> None:
        self.charged_s += result.charged_seconds()
        self.generations += 1

    def info(self) -> dict[str, Any]:
        return {
            "busy_seconds": self.clock.info()["busy_seconds"],
            "charged_seconds": round(self.charged_s, 3),
            "generations": self.generations,
        }


def record_refusal(refusal: Refusal) -> None:
    metrics.inc("hybrid_serve_refusals_total", reason="deadline", priority=refusal.priority)


class SLMEndpoints:
    """The SLM methods the orchestrator calls on every engine's deployment, over `slm_engine`;
    `warmup` is what the replica's warm-up generation took. Every generation waits for one of
    the engine's slots in a DeadlineQueue: interactive before batch, and refused at once when it
    cannot finish inside its deadline."""

    slm_engine: Engine
    engine_kind: str
    warmup: dict[str, Any] | None = None
    _queue: DeadlineQueue | None = None
    _time: ReplicaTime | None = None

    @property
    def replica_time(self) -> ReplicaTime:
        if self._time is None:
            self._time = ReplicaTime()
        return self._time

    @property
    def queue(self) -> DeadlineQueue:
        if self._queue is None:
            slots = int(self.slm_engine.info().get("contexts", 1))
            self._queue = DeadlineQueue(slots, on_refuse=record_refusal)
        return self._queue

    def _attributes(self, request: GenerationRequest) -> dict[str, Any]:
        return generation_attributes(self.engine_kind, self.slm_engine.model_name, request)

    def _record_wait(self, request: GenerationRequest) -> None:
        wait = self.queue.expected_wait_s(request.priority)
        # An unbounded wait (batch behind interactive work that fills the replica) goes in the
        # top bucket without making the histogram's sum infinite.
        metrics.observe("hybrid_serve_slm_expected_wait_seconds", min(wait, 2 * WAIT_S[-1]))
        if request.deadline_s is not None:
            metrics.observe("hybrid_serve_slm_deadline_seconds", request.deadline_s)

    async def generate(
        self, request: GenerationRequest, trace_context: TraceContext = None
    ) -> GenerationResult:
        attributes = self._attributes(request)
        with tracing.span("SLM.generate", trace_context, SpanKind.SERVER, attributes):
            self._record_wait(request)
            async with self.queue.slot(request):
                with self.replica_time.busy():
                    result = await self.slm_engine.generate(request)
            self.replica_time.charged(result)
            record_generation(result)
            return result

    async def generate_stream(
        self, request: GenerationRequest, trace_context: TraceContext = None
    ) -> AsyncIterator[str | GenerationResult]:
        """Text deltas, then the GenerationResult (call with `handle.options(stream=True)`)."""
        attributes = {**self._attributes(request), "hybrid.stream": True}
        with tracing.span("SLM.generate_stream", trace_context, SpanKind.SERVER, attributes):
            self._record_wait(request)
            async with self.queue.slot(request):
                with self.replica_time.busy():
                    async for item in self.slm_engine.stream(request):
                        if isinstance(item, GenerationResult):
                            self.replica_time.charged(item)
                            record_generation(item)
                        yield item

    async def status(self, trace_context: TraceContext = None) -> dict[str, Any]:
        return {
            "ready": True,
            "engine": self.engine_kind,  # as configured: llama_cpp, openai, vllm, or a class
            "placement": placement(),
            "model": self.slm_engine.model_name,
            "warmup": self.warmup,
            **self.slm_engine.info(),
            "queue": self.queue.info(),
            "replica_time": self.replica_time.info(),
        }


@serve.deployment(name="SLM")
class SLMDeployment(SLMEndpoints):
    """Binds its own section, the engine's settings (any change starts new replicas); the
    answer length and temperature travel with each request."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, slm: dict[str, Any], trace: dict[str, Any]
    ) -> None:
        cfg = SLMConfig.model_validate(slm)
        tracing.setup("SLM", TracingConfig.model_validate(trace))
        self.slm_engine = make_engine(cfg, replicas_on_node=cfg.replicas)
        self.engine_kind = cfg.engine
        self.warmup = await warm_up(self.slm_engine.generate, cfg.warmup_timeout_s)


def get_deployment_options(cfg: HybridServeConfig) -> dict[str, Any]:
    """Serve options of the SLM deployment for the in-process engines (llama_cpp, openai)."""
    slm = cfg.slm
    options: dict[str, Any] = {
        # Above contexts_per_replica, requests wait inside the replica for a free context; the
        # margin keeps status calls and short queues from waiting behind a long generation.
        "max_ongoing_requests": max(slm.max_ongoing_requests, slm.contexts_per_replica),
        "max_queued_requests": slm.max_queued_requests,
        "ray_actor_options": {"num_cpus": slm.num_cpus, "num_gpus": slm.num_gpus},
    }
    if slm.autoscaling is not None:
        options["autoscaling_config"] = slm.autoscaling.serve_options()
    else:
        options["num_replicas"] = slm.replicas
    if slm.engine == "llama_cpp" and (env := openmp_env()):
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    if not slm.num_gpus and cfg.placement.cpu_resources():
        options["ray_actor_options"]["resources"] = cfg.placement.cpu_resources()
    if slm.num_gpus and cfg.placement.slm_node_resource:
        options["ray_actor_options"]["resources"] = {cfg.placement.slm_node_resource: slm.num_gpus}
    return options


def bind_args(cfg: HybridServeConfig) -> tuple[Any, ...]:
    return cfg.slm.fixed(), cfg.tracing.model_dump(mode="json")


def build_slm(cfg: HybridServeConfig) -> Application:
    """The SLM deployment for the in-process engines; `slm_vllm.build_vllm_slm` for vllm."""
    return versioned(deployment(SLMDeployment), get_deployment_options(cfg), *bind_args(cfg))
