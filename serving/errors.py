"""One JSON error shape for every failure (`ErrorResponse`), and the handlers that produce it.

Bad input is always a 4xx naming the field; only a fault of the service itself is a 5xx.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from serving.schemas import ErrorResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request",
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.field = field
        self.headers = headers


def field_path(loc: Sequence[Any]) -> str | None:
    """("body", "texts", 2) -> "texts[2]"."""
    path = ""
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def error_response(request: Request, status: int, message: str, type: str, field: str | None = None, headers=None):
    request_id = getattr(request.state, "request_id", None)
    body = ErrorResponse(error=message, type=type, field=field, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(request, error.status, error.message, error.type, error.field, error.headers)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(
            request, 400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}", "malformed_json"
        )
    field = field_path(first["loc"])
    message = "missing request body" if first["type"] == "missing" and field is None else first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return error_response(request, 422, f"{field}: {message}" if field else message, "invalid_field", field)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    headers = error.headers
    if error.status_code == 405:
        # Starlette names the methods of the first route on the path; a path may have several (GET and POST
        # /v1/batches): `Allow` lists them all
        allowed = {
            method
            for route in request.app.routes
            if isinstance(route, Route) and route.path_regex.match(request.url.path)
            for method in route.methods or ()
        }
        headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
    return error_response(request, error.status_code, str(error.detail), "http_error", headers=headers)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(request, 500, f"internal error: {type(error).__name__}", "internal_error")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
