"""Tracing helpers with tracing off (this process installs no provider): trace ids still follow
the caller's W3C traceparent; exporters come from config or the standard variables."""

import json
import logging
import secrets

import pytest

from hybrid_serve.agents import tracing
from hybrid_serve.config import TracingConfig
from hybrid_serve.deployments.middleware import JSONLineFormatter, endpoint_of


def test_off_by_default_and_no_carrier(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing.exporters_from_env() == []
    assert not tracing.enabled() and tracing.carrier() is None


def test_exporters_from_config_over_environment(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp, console")
    assert tracing.exporters_from_env() == ["otlp", "console"]
    assert tracing.exporters_from_env(["none"]) == []
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.exporters_from_env() == []


def test_unknown_exporter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="zipkin"):
        tracing.exporters_from_env()


def test_config_as_standard_variables():
    cfg = TracingConfig(exporters=["otlp"], endpoint="http://collector:4318", service_name="qa")
    assert cfg.env() == {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_SERVICE_NAME": "qa",
    }
    assert TracingConfig().env() == {}


def test_request_span_continues_the_callers_trace_when_off():
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    with tracing.request_span("POST /v1/answer", {"traceparent": f"00-{trace_id}-{parent}-01"}):
        assert tracing.trace_id() == trace_id
        with tracing.span("Pipeline.answer"):  # nested no-op spans keep the id
            assert tracing.trace_id() == trace_id
    assert tracing.trace_id() == ""


@pytest.mark.parametrize(
    "header", ["", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "00-abc-def-01"]
)
def test_request_span_starts_a_fresh_trace_without_a_valid_header(header):
    with tracing.request_span("GET /v1/models", {"traceparent": header} if header else {}):
        first = tracing.trace_id()
    with tracing.request_span("GET /v1/models", {}):
        second = tracing.trace_id()
    assert len(first) == 32 and int(first, 16) != 0 and first != second


def test_endpoint_labels_have_low_cardinality():
    assert endpoint_of("/v1/answer") == "/v1/answer"
    assert endpoint_of("/v1/documents/a/b/c") == "/v1/documents/{doc_id}"
    assert endpoint_of("/wp-admin.php") == "other"


def test_request_log_line_is_one_json_object():
    record = logging.LogRecord("hybrid_serve.requests", logging.INFO, "", 0, "request", (), None)
    record.fields = {"trace_id": "ab" * 16, "status": 200, "reasons": ["low_confidence"]}
    line = JSONLineFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "request" and entry["status"] == 200 and entry["level"] == "INFO"
