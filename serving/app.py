"""The HTTP service: `create_app(cfg)` builds it; `llmops serve` runs it under uvicorn.

The routes live in `serving/routes/`, one file per protocol: ours (`/v1/predict`, ...), MLflow's
(`/invocations`), the Open Inference Protocol's (`/v2`) and OpenAI's (`/v1/completions`, ...); they share one
core, `serving.service.Service` (with `serving.generate` for generators).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_fastapi_instrumentator import Instrumentator

import llmops
from llmops.config import LlmopsConfig
from llmops.registry import resolve_tracking_uri
from serving import contract
from serving.access_log import batched_access_log
from serving.errors import install_handlers
from serving.metrics import Children, ServingMetrics
from serving.routes import batches, mlflow, oip, openai, ours, tokenize
from serving.schemas import ErrorResponse
from serving.service import Service
from serving.tracing import Tracing

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = tuple[tuple[bytes, bytes], ...]


# --- the app ---------------------------------------------------------------------------------------


UNTRACED = frozenset({"/healthz", "/readyz", "/ping", "/v2/health/live", "/v2/health/ready", "/metrics"})
"""What probes and scrapers call every few seconds: no trace of them."""


REQUEST_ID_SCOPE = "llmops.request_id"
"""The ASGI scope key under which a caller running the app itself gives the request its id."""


class RequestIds:
    """Random request ids (32 hex digits, as `uuid4().hex`), read from the OS 256 at a time.

    `os.urandom` lets go of the GIL for its system call, and an event loop that lets go of it on every request
    waits to get it back behind the inference thread: 70 us a request under load on two cores, measured, against
    0.3 us for the call alone. Ids stay unguessable (a caller's feedback names the request by its id).
    """

    BATCH = 256

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        self._lock = threading.Lock()  # Ray Serve's front may name requests from more than one thread

    def __call__(self) -> str:
        with self._lock:
            if self._at >= len(self._pool):
                self._pool, self._at = os.urandom(16 * self.BATCH), 0
            at = self._at
            self._at += 16
        return self._pool[at : at + 16].hex()


new_request_id = RequestIds()


class RequestContext:
    """A request id on every request and response (`X-Request-ID`); bodies over the limit refused before reading;
    the request's span, with its `traceparent` on the response, when tracing is on (`serving.tracing`)."""

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        max_body_bytes: int,
        tracing: Tracing,
        larger: dict[str, tuple[int, str]] | None = None,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.tracing = tracing
        self.larger = larger or {}
        """Paths that take larger bodies: their limit, and the setting that says it (`/v1/files`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # A caller that runs the app itself may name the request (Ray Serve's front: the id its proxy answers with).
        request_id = scope.get(REQUEST_ID_SCOPE) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        if self.tracing.on and scope["path"] not in UNTRACED:
            await self._traced(scope, receive, send, request_id)
            return
        await self._handle(scope, receive, send, request_id, ((b"x-request-id", request_id.encode()),))

    async def _traced(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        method = scope["method"]
        span, token = self.tracing.start_request(method, scope["path"], scope["headers"], request_id)
        status: list[int] = []

        async def send_traced(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        extra = ((b"x-request-id", request_id.encode()), (b"traceparent", self.tracing.traceparent(span)))
        try:  # the status is the span's: a request not sampled goes without the wrapper
            await self._handle(scope, receive, send_traced if span.is_recording() else send, request_id, extra)
        finally:
            route = scope.get("route")
            self.tracing.end_request(span, token, method, getattr(route, "path", None), status[0] if status else None)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, request_id: str, extra: Headers) -> None:
        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        refusal = None
        if scope["method"] in ("POST", "PUT", "PATCH"):
            if length is None and headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                refusal = (411, "send a Content-Length (chunked request bodies are not accepted)", "length_required")
            elif (
                length is not None
                and length.isdigit()
                and int(length)
                > (limit := self.larger.get(scope["path"], (self.max_body_bytes, "serve.max_body_bytes")))[0]
            ):
                refusal = (
                    413,
                    f"request body of {int(length)} bytes; at most {limit[0]} ({limit[1]})",
                    "body_too_large",
                )
        if refusal is not None:
            status, message, kind = refusal
            body = ErrorResponse(error=message, type=kind, request_id=request_id)
            await JSONResponse(body.model_dump(), status_code=status)(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)


class HttpMetrics:
    """`http_requests_total{handler,method,status}` and `http_request_duration_seconds{handler,method}` per request.

    The counts prometheus-fastapi-instrumentator's middleware kept, under its names (the handler is the route's
    template, `none` where no route matched), for a sixth of its cost: it matched the request against every route
    again and built a request, a response and four metrics' worth of labels each time, 60 us of the event loop's
    330 a request, measured; here the route is the one the router put in the scope.
    """

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        metrics: ServingMetrics,
        excluded: frozenset[str] = frozenset({"/metrics"}),
    ):
        self.app = app
        self.excluded = excluded
        self.requests = Children(metrics.http_requests)
        self.seconds = Children(metrics.http_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.excluded:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            handler, method = getattr(scope.get("route"), "path", None) or "none", scope["method"]
            self.requests(handler, method, str(status)).inc()
            self.seconds(handler, method).observe(time.perf_counter() - start)


def create_app(cfg: LlmopsConfig, tracking_uri: str | None = None) -> FastAPI:
    """The service for `cfg`, following `cfg.registry.model_name`@`cfg.serve.alias` in the given store."""

    uri = tracking_uri or resolve_tracking_uri(cfg.registry)
    service = Service(cfg, uri)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if cfg.serve.threads is not None:
            torch.set_num_threads(cfg.serve.threads)
        await service.start()
        access_log = batched_access_log()
        try:
            yield
        finally:
            await service.stop()
            access_log.close()

    app = FastAPIOffline(  # /docs and /redoc from files in the package: no CDN, so they render offline
        title="llmops serving",
        version=llmops.__version__,
        summary=f"{', '.join(cfg.served_models)} @{cfg.serve.alias}: our /v1, MLflow /invocations, Open Inference "
        "v2 and OpenAI's API.",
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # operationIds a client generator reads: `predict`
        # Spans and request metrics are the service's own (serving.tracing, HttpMetrics): FastAPI's would count each
        # request twice wherever a global OpenTelemetry provider is set, and asks every request whether one is.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = service
    install_handlers(app)
    # the library serves /metrics (every worker's values, with several); HttpMetrics counts the requests
    Instrumentator(registry=service.metrics.registry).expose(app, tags=["health"], response_class=PlainTextResponse)
    for protocol in (ours, mlflow, oip, openai, batches, tokenize):
        app.include_router(protocol.router)
    files = {"/v1/files": (cfg.serve.batches.max_file_bytes, "serve.batches.max_file_bytes")}
    app.add_middleware(HttpMetrics, metrics=service.metrics)
    app.add_middleware(RequestContext, max_body_bytes=cfg.serve.max_body_bytes, tracing=service.tracing, larger=files)
    contract.install(app, service, keys_required=service.gate.required)
    return app


CONFIG_ENV = "LLMOPS_SERVE_CONFIG"
OVERRIDES_ENV = "LLMOPS_SERVE_OVERRIDES"


def app_from_environment() -> FastAPI:
    """The app factory uvicorn calls in each worker: the config path and `--set` overrides come by environment."""
    from llmops.config import load_config

    overrides = json.loads(os.environ.get(OVERRIDES_ENV, "[]"))
    return create_app(load_config(os.environ.get(CONFIG_ENV) or None, overrides))
