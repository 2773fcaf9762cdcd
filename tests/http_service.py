"""Serving for tests: waiting for a served app over real HTTP (a process or a uvicorn thread), or the app in this
process (ASGI transport, real lifespan) with the official `openai` client in front of it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn
from asgi_lifespan import LifespanManager

from llmops.config import LlmopsConfig
from llmops.ports import free_port
from serving.app import create_app


def wait_until_ready(base: str, failure: Callable[[], str | None] = lambda: None, timeout: float = 120) -> None:
    """Poll `base`/readyz until it answers 200; `failure` names why the server can no longer come up, if so."""
    deadline = time.monotonic() + timeout
    while True:
        why = failure()
        assert why is None, why
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server not ready in {timeout:.0f} s"
        time.sleep(0.2)


def serve_process(workdir: Path, config: Path, tracking_uri: str) -> tuple[str, int, subprocess.Popen]:
    """The real `llmops serve --config config` on a free loopback port, run in `workdir`, once ready: its base URL,
    port and process (the caller stops it)."""
    port = free_port()
    cli = [sys.executable, "-c", "from cli.main import main; main()"]
    proc = subprocess.Popen(
        [*cli, "serve", "--config", str(config), "--port", str(port)],
        cwd=workdir,
        env=os.environ | {"MLFLOW_TRACKING_URI": tracking_uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def exited() -> str | None:
        if proc.poll() is None:
            return None
        return proc.stdout.read() if proc.stdout else "server exited"

    wait_until_ready(base, exited)
    return base, port, proc


@contextmanager
def served_in_thread(app: Any) -> Iterator[str]:
    """`app` on a free loopback port, served by uvicorn on a thread of this process, once ready: its base URL.
    Real HTTP: a client that hangs up is seen as gone (the in-process transport reads every answer whole)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@contextmanager
def server_process(
    command: list[str], log_path: Path, health: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[None]:
    """`command` started (its output in `log_path`) and waited for until `health` answers 200; stopped at the end."""
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(health, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, (
                    f"{Path(command[0]).name} did not start:\n{log_path.read_text()[-3000:]}"
                )
                time.sleep(0.5)
            yield
        finally:
            server.terminate()
            server.wait(timeout=30)


@contextmanager
def mlflow_server(backend_store_uri: str, root: Path) -> Iterator[str]:
    """A real `mlflow server` on `backend_store_uri` (its artifacts and log under `root`), once it answers: its
    URL. Stopped at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with server_process(command, root / "server.log", f"{url}/health"):
        yield url


@contextmanager
def prefect_server(host: str, home: Path) -> Iterator[str]:
    """A real Prefect server listening on `host` (SQLite under `home`), once it answers: its API URL."""
    port = free_port()
    api = f"http://{host}:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", host, "--port", str(port)]
    with server_process(command, home / "server.log", f"{api}/health", env):
        yield api


@asynccontextmanager
async def in_process(
    cfg: LlmopsConfig, tracking_uri: str, ready: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The service of `cfg` in this process, once ready (`ready`; else once every model's first load is over):
    an HTTP client on it, and the app."""
    app = create_app(cfg, tracking_uri=tracking_uri)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serving", timeout=60) as client:
            for _ in range(600 if ready else 0):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            yield client, manager.app


def openai_client(app: Any) -> openai.AsyncOpenAI:
    """The official client, unchanged, on an in-process app."""
    transport = httpx.ASGITransport(app=app)
    return openai.AsyncOpenAI(
        base_url="http://serving/v1",
        api_key="unused",
        http_client=httpx.AsyncClient(transport=transport, base_url="http://serving", timeout=60),
        max_retries=0,
    )
