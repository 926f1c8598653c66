"""OpenTelemetry tracing: one trace per request across every deployment.

Each Ray Serve replica is its own process with its own tracer provider (`setup`). Context crosses
deployment handles explicitly: the caller passes `carrier()` (a W3C `traceparent` mapping) as the
`trace_context` argument and the callee opens its span under `span(..., carrier=...)`.

Off by default (`OTEL_TRACES_EXPORTER` unset or `none`): no provider is installed, spans are the
API's no-op ones, and the request still gets a trace id of its own (or the caller's).

Spans carry ids, numbers and enums only; never the text of a query, a passage or an answer, so a
sensitive query cannot leak through a trace backend.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags

from hybrid_serve.config import TracingConfig

TRACER_NAME = "hybrid_serve"
DEFAULT_SERVICE_NAME = "hybrid-serve"
# What a deployment method receives as `trace_context`: W3C headers from `carrier()`, or None.
TraceContext = dict[str, str] | None

tracer = trace.get_tracer(TRACER_NAME)
_enabled = False


def enabled() -> bool:
    return _enabled


def exporters_from_env(configured: Sequence[str] | None = None) -> list[str]:
    """The exporters to use: configuration first, else OTEL_TRACES_EXPORTER (comma list)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = (
        list(configured)
        if configured is not None
        else os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",")
    )
    out = [n.strip().lower() for n in names if n.strip()]
    unknown = sorted(set(out) - {"otlp", "console", "none"})
    if unknown:
        raise ValueError(f"unsupported trace exporter(s) {unknown}; use otlp, console or none")
    return [n for n in out if n != "none"]


def setup(
    component: str,
    config: TracingConfig | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> bool:
    """Install this process's tracer provider; returns whether tracing is on.

    What `config` sets overrides the standard OTEL_TRACES_EXPORTER,
    OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT and OTEL_SERVICE_NAME. Everything else
    (OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_*, OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES) is read
    by the SDK itself.
    """
    global _enabled
    config = config or TracingConfig()
    endpoint, service_name = config.endpoint, config.service_name
    names = exporters_from_env(config.exporters)
    if _enabled or not names:
        return _enabled
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create(
        {
            "service.name": service_name
            or os.environ.get("OTEL_SERVICE_NAME")
            or DEFAULT_SERVICE_NAME,
            "hybrid_serve.component": component,
            **dict(attributes or {}),
        }
    )
    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = endpoint.rstrip("/") + "/v1/traces" if endpoint else None
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


def carrier() -> dict[str, str] | None:
    """The current context as W3C headers for a call to another deployment (None when off)."""
    if not _enabled:
        return None
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


@contextmanager
def span(
    name: str,
    carrier: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span, current for the block; with `carrier`, a child of the caller's span in another
    process. Exceptions are recorded on it and re-raised."""
    ctx = propagate.extract(carrier) if carrier else None
    with tracer.start_as_current_span(
        name, context=ctx, kind=kind, attributes=dict(attributes or {})
    ) as current:
        yield current


@contextmanager
def request_span(
    name: str, headers: Mapping[str, str], attributes: Mapping[str, Any] | None = None
) -> Iterator[Span]:
    """The server span of an HTTP request: continues the caller's `traceparent` when valid.

    With tracing off, a non-recording span with the caller's trace id (or a fresh one) is made
    current, so the response's `trace_id` is the same either way. If an HTTP instrumentation has
    opened the server span already (FastAPI's native telemetry, OTel's ASGI middleware), that one
    is the request's span: a second would split the trace."""
    current = trace.get_current_span()
    if current.is_recording() and current.get_span_context().is_valid:
        yield current
        return
    ctx = propagate.extract(headers)
    if _enabled:
        with tracer.start_as_current_span(
            name, context=ctx, kind=SpanKind.SERVER, attributes=dict(attributes or {})
        ) as current:
            yield current
        return
    parent = trace.get_current_span(ctx).get_span_context()
    if not parent.is_valid:
        parent = SpanContext(
            trace_id=int(secrets.token_hex(16), 16),
            span_id=int(secrets.token_hex(8), 16),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
        )
    local = NonRecordingSpan(parent)
    token = otel_context.attach(trace.set_span_in_context(local))
    try:
        yield local
    finally:
        otel_context.detach(token)


def trace_id() -> str:
    """The current trace's id, 32 hex digits ('' outside any span)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def set_attributes(target: Span, attributes: Mapping[str, Any]) -> None:
    """Set what is not None (OTel rejects None values)."""
    if target.is_recording():
        target.set_attributes({k: v for k, v in attributes.items() if v is not None})


def annotate(attributes: Mapping[str, Any]) -> None:
    """Attributes on the current span."""
    set_attributes(trace.get_current_span(), attributes)
