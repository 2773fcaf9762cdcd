"""Route dependencies: the service, API-key auth, JSON content type, text limits."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBearer

from llmops.config import ServeConfig
from serving.auth import CALLER
from serving.errors import ApiError
from serving.service import Service

# Dependencies are `async def`: FastAPI runs a plain `def` dependency in a thread pool, a thread hop per
# request for a few attribute reads.


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]

KEY_SCHEMES = (
    HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`"),
    APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`"),
)
"""How a caller sends its key. The key dependency reads them itself (`key_sent`), and `serving.contract` declares
them on its routes: as `Security` sub-dependencies FastAPI solved both on every request, 27 us of the event loop's
290 (measured), for two header reads."""


def key_sent(request: Request) -> str | None:
    """The key in `X-API-Key`, else in `Authorization: Bearer`, read as `KEY_SCHEMES` read them (an empty one is
    none), without the credentials object the bearer scheme builds (5 us of the event loop a request, profiled)."""
    headers = request.headers
    given = headers.get("x-api-key")
    if given:
        return given
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    credentials = credentials.strip()
    return credentials if credentials and scheme.lower() == "bearer" else None


def require_key(group: str, json_body: bool = False) -> Any:
    """The dependency of a route of `group`, which gives the route the service: with keys configured, the
    caller's key must exist, may call `group`, and be within its limits (401, 403, 429 with Retry-After); the
    caller is then `CALLER`. With `json_body`, the request must then also say it sends JSON (415). One
    dependency, not three (the key, the content type, the service), as FastAPI spends about 10 us of the event
    loop a request on each it solves."""

    async def key_of_the_caller(request: Request) -> Service:
        service: Service = request.app.state.service
        await _check_key(request, group, service)
        if json_body:
            await require_json(request)
        return service

    key_of_the_caller.key_group = group  # type: ignore[attr-defined]  # what the contract declares security on
    return key_of_the_caller


async def _check_key(request: Request, group: str, service: Service) -> None:
    gate = service.gate
    if not gate.required:
        return
    given = key_sent(request)
    with service.tracing.span("auth"):
        caller = await gate.caller(given)
    if caller is None:
        raise ApiError(
            401,
            "missing or invalid API key (send `Authorization: Bearer <key>` or `X-API-Key: <key>`)",
            type="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not caller.may_call(group):
        raise ApiError(403, f"key '{caller.name}' may not call {group} routes", type="forbidden")
    with service.tracing.span("limits", **{"llmops.key": caller.name}):
        refusal = await gate.refusal(caller)
    if refusal is not None:
        raise ApiError(
            429,
            f"key '{caller.name}' is over its limit of {refusal.message}: retry in {refusal.retry_after_s} s",
            type=f"rate_limited:{refusal.limit}",
            headers={"Retry-After": str(refusal.retry_after_s)},
        )
    CALLER.set(caller)


async def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(
            415, f"Content-Type must be application/json, not '{content_type or 'none'}'", type="unsupported_media_type"
        )


def check_texts(texts: list[Any], field: str, cfg: ServeConfig) -> list[str]:
    """The texts of one request, within the configured limits, or a 4xx naming the field at fault."""
    if not texts:
        raise ApiError(422, f"{field}: give at least one text", type="invalid_field", field=field)
    if len(texts) > cfg.max_texts:
        raise ApiError(
            422,
            f"{field}: {len(texts)} texts in one request; at most {cfg.max_texts} (serve.max_texts)",
            type="too_many_texts",
            field=field,
        )
    out = []
    for i, text in enumerate(texts):
        where = f"{field}[{i}]"
        if not isinstance(text, str):
            raise ApiError(
                422, f"{where}: must be a string, not {type(text).__name__}", type="invalid_field", field=where
            )
        if not text.strip():
            raise ApiError(422, f"{where}: empty text", type="invalid_field", field=where)
        if len(text) > cfg.max_text_chars:
            if cfg.over_length == "reject":
                raise ApiError(
                    422,
                    f"{where}: {len(text)} characters; at most {cfg.max_text_chars} (serve.max_text_chars)",
                    type="text_too_long",
                    field=where,
                )
            text = text[: cfg.max_text_chars]
        out.append(text)
    return out


# The service, for a route of each group (`service: ForInference`); routes that ask for no key take `ServiceDep`.
ForInference = Annotated[Service, Depends(require_key("inference"))]
ForInferenceJson = Annotated[Service, Depends(require_key("inference", json_body=True))]
ForFeedback = Annotated[Service, Depends(require_key("feedback", json_body=True))]
ForMonitoring = Annotated[Service, Depends(require_key("monitoring"))]
