"""HTTP errors in one shape per API: `{"error": {"message", "type", "code"}}` (OpenAI's) on every
route but `/v1/messages`, which answers as the Messages API does, `{"type": "error", "error":
{"type", "message"}}`, so that each SDK raises its own typed errors with the message intact.

No traceback and no bare 500 ever reaches a client: bad input is a 4xx that says what to fix,
an overloaded or still-loading cluster a 503 with Retry-After, our own bug a 500 with a trace id.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from hybrid_serve.agents.interfaces import Unavailable
from hybrid_serve.engines.prompt_fit import PromptTooLong
from hybrid_serve.schemas import BODY_SHAPES, NON_BLANK

log = logging.getLogger("ray.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


MESSAGES_PATH = "/v1/messages"


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error response, on every route."""

    error: ErrorDetail


class MessagesErrorDetail(BaseModel):
    type: str
    message: str


class MessagesErrorBody(BaseModel):
    """Every error response of /v1/messages, as the Messages API shapes them."""

    type: Literal["error"]
    error: MessagesErrorDetail


def path_of(scope: Scope) -> str:
    """The request's path below the application's root path."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def error_responses(
    *statuses: int, model: type[BaseModel] = ErrorBody
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route can return."""
    words = {
        400: "Body is not valid UTF-8 or JSON",
        401: "Missing or invalid API key",
        403: "The API key may not write that collection",
        404: "Not found",
        413: "Body too large",
        429: "Over the API key's request rate (see Retry-After)",
        422: "Invalid input",
        503: "Overloaded or not ready (see Retry-After)",
        504: "Nothing was ready by the request's deadline (X-Request-Timeout)",
    }
    return {s: {"model": model, "description": words.get(s, "Error")} for s in statuses}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def error_body(
    status: int, message: str, code: str | None = None, path: str = ""
) -> dict[str, Any]:
    """The error as the API at `path` shapes it."""
    kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if path == MESSAGES_PATH:
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "code": code}}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    path: str = "",
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, code, path), status_code=status, headers=headers
    )


def _describe(errors: list[dict[str, Any]]) -> tuple[str, str]:
    """One readable sentence per problem, e.g. "top_k: Input should be less than or equal to 50"."""
    parts = []
    code = "invalid_request"
    for err in errors[:10]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if loc and loc[0] in BODY_SHAPES:
            loc = loc[1:]  # which shape of a union body was meant: not a field
        where = ".".join(loc) or "body"
        kind = err.get("type", "")
        if kind == "json_invalid":
            parts.append("body is not valid JSON")
            code = "invalid_json"
        elif kind == "extra_forbidden":
            parts.append(f"{where}: unknown field")
            code = "unknown_field"
        elif where == "body" and kind in ("model_attributes_type", "dict_type", "model_type"):
            parts.append("body must be a JSON object sent with Content-Type: application/json")
            code = "invalid_json"
        elif kind == "missing":
            parts.append(f"{where}: field required")
        elif kind == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == NON_BLANK:
            parts.append(f"{where}: must not be empty or whitespace")
        else:
            msg = str(err.get("msg", "invalid value"))
            parts.append(f"{where}: {msg.removeprefix('Value error, ')}")
    if len(errors) > 10:
        parts.append(f"and {len(errors) - 10} more")
    return "; ".join(parts), code


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's 405 names only the first route
    whose path matched, so GET /v1/documents/{id} hid its DELETE from the Allow header."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        # A dependency that could not serve a step the answer needs: overloaded, a replica
        # gone, the index loading, the SLM's stream cut.
        wait = str(max(1, math.ceil(exc.retry_after_s or 1)))
        return error_response(
            503,
            exc.detail or f"{exc.reason}; retry shortly",
            exc.reason,
            {"Retry-After": wait},
            path_of(request.scope),
        )

    @app.exception_handler(PromptTooLong)
    async def _too_long(request: Request, exc: PromptTooLong) -> JSONResponse:
        # The question (and its instructions) alone outgrow the SLM's context.
        return error_response(400, str(exc), "prompt_too_long", path=path_of(request.scope))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, exc.code, exc.headers, path_of(request.scope)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = path_of(request.scope)
        errors = list(exc.errors())
        model = next((e for e in errors if tuple(e.get("loc", ()))[-1:] == ("model",)), None)
        if model is not None and model.get("type") == "literal_error":
            # As OpenAI answers an unknown model: 404, naming the ones there are.
            expected = model.get("ctx", {}).get("expected", "")
            return error_response(
                404,
                f"The model {model.get('input')!r} does not exist; available: {expected}",
                "model_not_found",
                path=path,
            )
        message, code = _describe(errors)
        # A body that is not JSON at all is the same error however the parser got there.
        return error_response(400 if code == "invalid_json" else 422, message, code, path=path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = "body_too_large" if exc.status_code == 413 else None
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; see /docs for the API"
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
            message = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
        return error_response(
            exc.status_code, message, code, headers or None, path_of(request.scope)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        trace_id = getattr(request.state, "trace_id", "")
        log.exception("unhandled error (trace %s)", trace_id)
        return error_response(
            500,
            f"internal error; quote trace id {trace_id} when reporting it",
            "internal_error",
            path=path_of(request.scope),
        )
