"""The OpenAPI document as the server behaves: what FastAPI derives from the models, plus what
only the configuration knows (length and count limits, the deadline header, API keys) and the
statuses every operation can answer, each with its API's error body (the Messages API's on
`/v1/messages`, OpenAI's everywhere else).

Generated clients and gateways validate against this document, and the API fuzzer in CI checks the
server against it, so a rule the server enforces and the schema omits is a bug either way.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from hybrid_serve.config import HTTPConfig
from hybrid_serve.deployments.errors import MESSAGES_PATH, error_responses
from hybrid_serve.schemas import MIN_TIMEOUT_S, PRIORITIES

BODY_METHODS = {"post", "put", "patch"}


def document(app: FastAPI, http: HTTPConfig) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    _limits(schema.get("components", {}).get("schemas", {}), http)
    statuses = (
        (401, 422, 504, 429)
        if any(k.requests_per_minute for k in http.keys())
        else (
            401,
            422,
            504,
        )
    )
    errors = {str(status): spec for status, spec in error_responses(*statuses).items()}
    body_errors = {str(status): spec for status, spec in error_responses(400, 413).items()}
    header = {
        "name": "X-Request-Timeout",
        "in": "header",
        "required": False,
        "description": "This request's deadline in seconds (default http.request_timeout_s).",
        "schema": {
            "type": "number",
            "minimum": MIN_TIMEOUT_S,
            "maximum": http.max_request_timeout_s,
        },
    }
    priority = {
        "name": "X-Priority",
        "in": "header",
        "required": False,
        "description": "batch: yields to interactive work in every queue and is refused first "
        "under overload (default interactive).",
        "schema": {"type": "string", "enum": list(PRIORITIES)},
    }
    if http.api_keys:
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
    for path, operations in schema.get("paths", {}).items():
        open_path = path in ("/healthz", "/readyz")
        body = "MessagesErrorBody" if path == MESSAGES_PATH else "ErrorBody"
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            for status, spec in errors.items():
                if status in ("401", "429") and (open_path or not http.api_keys):
                    continue
                # replaces FastAPI's own 422 shape, which we never send
                responses[status] = _plain(spec, body)
            if method in BODY_METHODS:
                responses.update({s: _plain(spec, body) for s, spec in body_errors.items()})
            op.setdefault("parameters", []).extend([header, priority])
            if http.api_keys and not open_path:
                op["security"] = [{"bearer": []}, {"apiKey": []}]
    return schema


def _plain(spec: dict[str, Any], body: str) -> dict[str, Any]:
    return {
        "description": spec["description"],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
    }


def _limits(schemas: dict[str, Any], http: HTTPConfig) -> None:
    """The configured limits on the models that carry them."""
    for name in ("AnswerRequest", "SearchRequest"):
        query = schemas.get(name, {}).get("properties", {}).get("query")
        if query is not None:
            query["maxLength"] = http.max_query_chars
    message = schemas.get("ChatMessage", {}).get("properties", {}).get("content", {})
    for branch in message.get("anyOf", []):
        if branch.get("type") == "string":
            branch["maxLength"] = http.max_query_chars
    for name in ("TextPart", "TextBlockIn"):
        text = schemas.get(name, {}).get("properties", {}).get("text")
        if text is not None:
            text["maxLength"] = http.max_query_chars
    for name, field in (("MessageIn", "content"), ("MessagesRequest", "system")):
        for branch in schemas.get(name, {}).get("properties", {}).get(field, {}).get("anyOf", []):
            if branch.get("type") == "string":
                branch["maxLength"] = http.max_query_chars
    messages = schemas.get("MessagesRequest", {}).get("properties", {})
    if "messages" in messages:
        messages["messages"]["maxItems"] = http.max_messages
    if "max_tokens" in messages:
        messages["max_tokens"]["maximum"] = http.max_tokens_ceiling
    chat = schemas.get("ChatCompletionRequest", {}).get("properties", {})
    if "messages" in chat:
        chat["messages"]["maxItems"] = http.max_messages
    for field in ("max_tokens", "max_completion_tokens"):
        for branch in chat.get(field, {}).get("anyOf", []):
            if branch.get("type") == "integer":
                branch["maximum"] = http.max_tokens_ceiling
