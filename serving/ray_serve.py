"""The service on Ray Serve (`llmops serve --ray`): the same application, as replicas on a Ray cluster.

Two deployments:
- `Replica`: the whole service of `serving.app.create_app` (every model following its alias, batching, the
  prediction log, guards, keys), one per replica, autoscaled between `serve.min_replicas` and
  `serve.max_replicas` on the requests in flight; each runs the app's ASGI calls itself, so a streamed answer
  streams;
- `Front`: the HTTP ingress Ray Serve's proxies send every request to. It hands the request to a replica and,
  when that replica dies before it starts answering (its process or its node gone), to another, up to
  `serve.ray.retries` times. Once a replica has started answering, its death ends the answer where it is: a
  streamed answer stops without its final `data: [DONE]`, a whole one with a cut body.

The replicas read the config from the working directory the command ran in, on every node (a shared path, as
for the lifecycle on Ray).
"""

import asyncio
import json
import os
import signal
import threading
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from llmops.config import LlmopsConfig, load_config
from llmops.ports import cluster_env, node_address

APP_NAME = "llmops"
REPLICA_HEADER = "x-llmops-replica"
"""On every answer through Ray Serve: the node and process of the replica that answered."""
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the front received it."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None
    request_id: str | None
    """The id Ray Serve's proxy gave the request (and answers with): the service logs it as its own."""


class Replica:
    """One replica: the service, and its ASGI app run for each forwarded request."""

    def __init__(self, config: str | None, overrides: list[str], cwd: str):
        if not Path(cwd).is_dir():
            raise RuntimeError(
                f"{cwd} is not visible on {node_address()}: Ray Serve replicas run from the directory `llmops serve "
                "--ray` ran in, which must be on storage every node sees at the same path (docs/scale.md)"
            )
        os.chdir(cwd)
        from serving.app import create_app  # the replica's imports: torch, transformers, the models

        self.app = create_app(load_config(config, overrides))
        self.name = f"{node_address()}/{os.getpid()}"
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._started: asyncio.Task[Any] | None = None

    async def _start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._lifespan.__aenter__())  # the models load once
        await asyncio.shield(self._started)

    async def check_health(self) -> None:
        await self._start()

    async def handle(self, request: Forwarded) -> AsyncIterator[tuple[str, Any]]:
        """A streamed answer: ("start", (status, headers)) then ("body", bytes) for each chunk the app sends."""
        async for message in self._asgi(request):
            if message["type"] == "http.response.start":
                yield "start", (message["status"], self._headers(message))
            elif message["type"] == "http.response.body" and message.get("body"):
                yield "body", message["body"]

    async def whole(self, request: Forwarded) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """A whole answer: status, headers, body (one reply: cheaper than a stream of them)."""
        status, headers, chunks = 500, [], []
        async for message in self._asgi(request):
            if message["type"] == "http.response.start":
                status, headers = message["status"], self._headers(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
        return status, headers, b"".join(chunks)

    def _headers(self, start: MutableMapping[str, Any]) -> list[tuple[bytes, bytes]]:
        return [*start.get("headers", []), (REPLICA_HEADER.encode(), self.name.encode())]

    async def _asgi(self, request: Forwarded) -> AsyncIterator[MutableMapping[str, Any]]:
        """The app's ASGI messages for `request`, as it sends them."""
        from serving.app import REQUEST_ID_SCOPE

        await self._start()
        messages: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
        done = asyncio.Event()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": request.path.encode(),
            "query_string": request.query,
            "root_path": "",
            "headers": request.headers,
            "client": request.client,
            "server": (node_address(), 0),
            REQUEST_ID_SCOPE: request.request_id,
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            await messages.put(message)

        call = asyncio.ensure_future(self.app(scope, receive, send))
        call.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                yield message
            call.result()  # an error the app did not answer
        finally:
            done.set()
            if not call.done():
                call.cancel()


def _streamed(body: bytes) -> bool:
    """Whether the request asks for a streamed answer (`"stream": true` in its JSON body)."""
    if b'"stream"' not in body:
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("stream") is True


def _answer_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The replica's headers but its request id: Ray Serve's proxy adds the same one."""
    return [(k, v) for k, v in headers if k.lower() != b"x-request-id"]


def _unavailable(attempt: int, error: Exception) -> JSONResponse:
    message = f"no replica answered after {attempt + 1} tries: {type(error).__name__}"
    return JSONResponse({"error": message, "type": "replica_unavailable"}, status_code=503)


front = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # every path is the replicas'


@serve.ingress(front)  # here, not when deploying: every process that imports this module sees the same routes
class Front:
    """The ingress: each request to a replica, and to another when its replica dies before answering."""

    def __init__(self, replica: DeploymentHandle, retries: int):
        self.streamed = replica.options(method_name="handle", stream=True)
        self.whole = replica.options(method_name="whole")
        self.retries = retries

    @front.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, request: Request) -> Response:  # annotations evaluated: FastAPI reads them here
        forwarded = Forwarded(
            request.method,
            request.url.path,
            request.url.query.encode(),
            [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
            await request.body(),
            (request.client.host, request.client.port) if request.client else None,
            request.headers.get("x-request-id"),  # the proxy's: it adds it to the answer too
        )
        if not _streamed(forwarded.body):
            return await self._whole(forwarded)
        for attempt in range(self.retries + 1):
            answer = cast(DeploymentResponseGenerator, self.streamed.remote(forwarded))
            try:
                kind, (status, headers) = await answer.__anext__()
            except REPLICA_GONE as error:
                if attempt == self.retries:
                    return _unavailable(attempt, error)
                continue
            assert kind == "start"
            break

        async def body() -> AsyncIterator[bytes]:
            try:
                async for _, chunk in answer:
                    yield chunk
            except REPLICA_GONE:
                return  # the replica died mid-answer: the answer ends here (docs/scale.md)

        response = StreamingResponse(body(), status_code=status)
        response.raw_headers = _answer_headers(headers)
        return response

    async def _whole(self, forwarded: Forwarded) -> Response:
        for attempt in range(self.retries + 1):
            try:
                status, headers, content = await self.whole.remote(forwarded)
            except REPLICA_GONE as error:
                if attempt == self.retries:
                    return _unavailable(attempt, error)
                continue
            response = Response(content, status_code=status)
            response.raw_headers = _answer_headers(headers)
            return response
        raise AssertionError("unreachable")


def application(cfg: LlmopsConfig, config: str | None, overrides: list[str]) -> Any:
    """The Serve application: the front over autoscaled replicas of the service."""
    serving, ray_cfg = cfg.serve, cfg.serve.ray
    replica_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": ray_cfg.replica_cpus, "num_gpus": ray_cfg.replica_gpus},
        "max_ongoing_requests": ray_cfg.max_ongoing_requests,
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 30,
    }
    if serving.max_replicas > serving.min_replicas:
        replica_options["autoscaling_config"] = {
            "min_replicas": serving.min_replicas,
            "initial_replicas": serving.min_replicas,
            "max_replicas": serving.max_replicas,
            "target_ongoing_requests": ray_cfg.target_ongoing_requests,
            "upscale_delay_s": ray_cfg.upscale_delay_s,
            "downscale_delay_s": ray_cfg.downscale_delay_s,
            "metrics_interval_s": 2,
            "look_back_period_s": 10,
        }
    else:
        replica_options["num_replicas"] = serving.min_replicas
    quiet = {"enable_access_log": False}  # a log line per request costs more than the request here
    replica: Any = serve.deployment(Replica, name="Replica", logging_config=quiet, **replica_options)
    ingress: Any = serve.deployment(
        Front,
        name="Front",
        logging_config=quiet,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1024, ray_cfg.max_ongoing_requests * serving.max_replicas),
    )
    absolute = str(Path(config).resolve()) if config else None
    return ingress.bind(replica.bind(absolute, overrides, os.getcwd()), ray_cfg.retries)


def run(cfg: LlmopsConfig, config: str | None, overrides: list[str], host: str, port: int, address: str | None) -> None:
    """Deploy on the Ray cluster at `address` (else `RAY_ADDRESS`, which must be set) and keep it deployed until
    this process is stopped (Ctrl-C, SIGTERM), which deletes the application, and Serve itself when no other
    application uses it. Serve already running on the cluster keeps its own host and port."""
    import ray

    ray.init(address=address or os.environ["RAY_ADDRESS"], runtime_env={"env_vars": cluster_env()},
             log_to_driver=False)  # fmt: skip
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(cfg, config, overrides), name=APP_NAME, route_prefix="/")
    print(f"llmops serving on Ray Serve: http://{host}:{port} (replicas {cfg.serve.min_replicas}-"
          f"{cfg.serve.max_replicas}); Ctrl-C deletes the application", flush=True)  # fmt: skip
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)
    if not serve.status().applications:  # Serve was ours alone: its proxies (and their port) go with it
        serve.shutdown()
    print(json.dumps({"deleted": APP_NAME}), flush=True)
