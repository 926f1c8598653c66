"""The other deployments, as the ingress calls them: one method call over a Ray handle, with the
trace context, cancellation that reaches the other replica, reads repeated on a live replica
when theirs died (stamina's backoff), and Ray's failures mapped — once, here — to the pipeline's
`Unavailable`: overloaded (Serve's back-pressure), a replica gone, the index still loading."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn, Protocol

import stamina
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from hybrid_serve.agents import tracing
from hybrid_serve.agents.interfaces import LLMCall, LLMResult, Role, Unavailable
from hybrid_serve.deployments.metrics import metrics
from hybrid_serve.engines.prompt_fit import PromptTooLong

# Reads whose replica died go again: Serve's routers learn of a death within about a second,
# and its controller starts a replacement.
READ_ATTEMPTS = 5
BACKOFF_INITIAL_S, BACKOFF_MAX_S = 0.2, 2.0
OVERLOADED_RETRY_AFTER_S = 2.0


class IndexNotReady(RuntimeError):
    """The retriever is still loading or indexing (raised in its replica)."""


def cause(exc: BaseException) -> BaseException:
    """The exception raised inside a replica, unwrapped from Ray's RayTaskError."""
    return getattr(exc, "cause", None) or exc


def unavailable(exc: BaseException, deployment: str) -> Unavailable | None:
    """Ray's failure as the pipeline's error, or None for one that is not about availability."""
    inner = cause(exc)
    if isinstance(inner, Unavailable):
        return Unavailable(inner.reason, inner.detail, inner.retry_after_s, inner.expected_s)
    if isinstance(exc, BackPressureError):
        return Unavailable(
            "overloaded", "the cluster is at capacity; retry shortly", OVERLOADED_RETRY_AFTER_S
        )
    if isinstance(exc, RayActorError):
        return Unavailable("replica_failed", f"a {deployment} replica failed; retry", 1.0)
    if isinstance(inner, IndexNotReady):
        return Unavailable("index_not_ready", f"{inner}; retry shortly", 5.0)
    return None


def _reraise(exc: Exception, deployment: str) -> NoReturn:
    """What a failed call raises here: Unavailable for the cluster's own trouble, the client's
    error (a prompt too long for the model) as itself, anything else as Ray raised it."""
    inner = cause(exc)
    if isinstance(inner, PromptTooLong):
        raise inner from None
    out = unavailable(exc, deployment)
    if out is None:
        raise exc
    raise out from exc


class Backend(Protocol):
    """A deployment's methods as the ingress calls them (`HandleBackend` in the cluster; a local
    object in unit tests)."""

    name: str

    async def call(self, method: str, *args: Any, read: bool = False) -> Any: ...

    def stream(self, method: str, *args: Any) -> AsyncIterator[Any]: ...


class HandleBackend:
    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle
        self.name = str(handle.deployment_name)

    async def _once(self, method: str, *args: Any) -> Any:
        response = getattr(self.handle, method).remote(*args, trace_context=tracing.carrier())
        try:
            return await response
        except asyncio.CancelledError:  # a deadline, a client gone: stop it there too
            response.cancel()
            raise

    async def call(self, method: str, *args: Any, read: bool = False) -> Any:
        """`read`: safe to repeat, so when its replica dies under it the call goes again, to a
        live replica (or Serve's replacement); a write is never repeated behind the client's
        back."""
        retry = stamina.retry_context(
            on=RayActorError,
            attempts=READ_ATTEMPTS if read else 1,
            timeout=None,
            wait_initial=BACKOFF_INITIAL_S,
            wait_max=BACKOFF_MAX_S,
            wait_jitter=0.1,
        )
        try:
            async for attempt in retry:
                with attempt:
                    if attempt.num > 1:
                        metrics.inc("hybrid_serve_replica_retries_total", target=self.name)
                        tracing.annotate({"hybrid.replica_retries": attempt.num - 1})
                    return await self._once(method, *args)
        except Exception as exc:
            _reraise(exc, self.name)
        raise AssertionError("unreachable")

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        """A streaming method's items. Not repeated when its replica dies: part may have been
        sent; the stream ends with the mapped error instead."""
        items = getattr(self.handle.options(stream=True), method).remote(
            *args, trace_context=tracing.carrier()
        )
        try:
            async for item in items:
                yield item
        except Exception as exc:
            _reraise(exc, self.name)


class LLMViaBackend:
    """The pipeline's LLMRoles over the LLM proxy: whatever goes wrong on the way comes back as
    Unavailable, so the request goes on without the tier."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await self.backend.call(method, *args)
        except Unavailable:
            raise
        except Exception as exc:  # the proxy itself is broken
            raise Unavailable("claude_unavailable", type(cause(exc)).__name__) from None

    async def call(self, role: Role, request: LLMCall) -> LLMResult:
        return await self._call("call", role, request)

    async def finish_request(
        self,
        request_id: str,
        slm_cost_usd: float,
        all_llm_estimate_usd: float,
        requests: int = 1,
    ) -> None:
        await self._call("finish_request", request_id, slm_cost_usd, all_llm_estimate_usd, requests)
