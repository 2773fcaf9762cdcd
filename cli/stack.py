"""The local stack (`make up` / `make down`): every service as a real process on loopback, as one unit.

`up` checks every port first (a taken port stops it before anything starts), then starts, in order,
the MLflow tracking server (SQLite store, local artifact folder), the Prefect server, the
`llmops` process work pool with the deployments of prefect.yaml and a worker on it, the serving API
and the Evidently UI. It waits for each health check, prints every URL and keeps logs and pid files
under one folder. If a service does not come up, everything started so far is stopped again and
its log tail is shown. `down` stops exactly the processes whose pid files `up` wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llmops.config import LlmopsConfig
from llmops.ports import process_alive

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "llmops"


class StackError(RuntimeError):
    """The stack cannot start (or stop); the message says why."""


@dataclass(frozen=True)
class Ports:
    mlflow: int = 5000
    prefect: int = 4200
    serving: int = 8000
    evidently: int = 8001


@dataclass
class Stack:
    home: Path
    ports: Ports
    urls: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What a shell (or a flow run) needs to talk to this stack."""
        return {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.ports.mlflow}",
            "PREFECT_API_URL": f"http://127.0.0.1:{self.ports.prefect}/api",
        }


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

    return True


def _pids(home: Path) -> dict[str, int]:
    folder = home / "pids"
    if not folder.is_dir():
        return {}
    files = sorted(folder.glob("*.pid"), key=lambda p: p.stat().st_mtime_ns)  # in the order they started
    return {p.stem: int(p.read_text()) for p in files}


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env |= {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "PWD": str(REPO),  # prefect.yaml's pull step: flow runs start in the repository
    }
    return env


def _start(home: Path, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(home / "logs" / f"{name}.log", "ab")  # noqa: SIM115  the child keeps it
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (home / "pids" / f"{name}.pid").write_text(str(process.pid))
    return process


def _wait(name: str, process: subprocess.Popen[bytes], check: Callable[[], bool], home: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            break
        try:
            if check():
                return
        except (httpx.HTTPError, OSError, ValueError):
            pass
        time.sleep(0.5)
    tail = (home / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
    reason = f"exited with {process.returncode}" if process.poll() is not None else f"no answer in {timeout:.0f} s"
    raise StackError(f"{name} did not come up ({reason}); last lines of {home / 'logs' / f'{name}.log'}:\n{tail}")


def _get_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2).status_code == 200


def _run(command: list[str], env: dict[str, str], home: Path, what: str) -> None:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    with open(home / "logs" / "setup.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise StackError(f"{what} failed:\n{(done.stdout + done.stderr)[-2000:]}")


def up(home: Path, ports: Ports, cfg: LlmopsConfig, config_path: str, overrides: list[str]) -> Stack:
    """Start the whole stack or nothing. Raises StackError with the reason."""
    home = home.resolve()
    running = {name: pid for name, pid in _pids(home).items() if process_alive(pid)}
    if running:
        raise StackError(f"a stack is already up from {home} ({', '.join(running)}): `make down` first")
    taken = [f"{port} ({name})" for name, port in vars(ports).items() if not _port_free(port)]
    if taken:
        raise StackError(f"port {', '.join(taken)} already taken: free it or choose another (llmops up --help)")
    for folder in ("logs", "pids", "prefect"):
        (home / folder).mkdir(parents=True, exist_ok=True)
    stack = Stack(home, ports)
    env = _base_env(home) | stack.env
    try:
        _up(stack, env, cfg, config_path, overrides)
    except BaseException:
        down(home)
        raise
    (home / "urls.json").write_text(json.dumps(stack.urls, indent=2))
    return stack


def _up(stack: Stack, env: dict[str, str], cfg: LlmopsConfig, config_path: str, overrides: list[str]) -> None:
    home, ports = stack.home, stack.ports
    mlflow = _start(
        home,
        "mlflow",
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "mlartifacts"), "--host", "127.0.0.1", "--port", str(ports.mlflow)],
        env,
    )  # fmt: skip
    _wait("mlflow", mlflow, _get_ok(f"http://127.0.0.1:{ports.mlflow}/health"), home, 120)
    stack.urls["MLflow UI"] = f"http://127.0.0.1:{ports.mlflow}"

    prefect = _start(
        home, "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                 str(ports.prefect)], env
    )  # fmt: skip
    _wait("prefect-server", prefect, _get_ok(f"http://127.0.0.1:{ports.prefect}/api/health"), home, 180)
    stack.urls["Prefect UI"] = f"http://127.0.0.1:{ports.prefect}"
    _run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"], env, home, "pool")
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env, home, "prefect deploy --all")

    worker = _start(home, "prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL], env)
    workers_url = f"http://127.0.0.1:{ports.prefect}/api/work_pools/{POOL}/workers/filter"
    _wait("prefect-worker", worker, lambda: bool(httpx.post(workers_url, json={}, timeout=2).json()), home, 120)

    serve_args = ["--config", config_path, *[a for o in overrides for a in ("--set", o)]]
    serving = _start(home, "serving", [str(BIN / "llmops"), "serve", *serve_args, "--port", str(ports.serving)], env)
    _wait("serving", serving, _get_ok(f"http://127.0.0.1:{ports.serving}/healthz"), home, 120)
    stack.urls["Serving API"] = f"http://127.0.0.1:{ports.serving}/docs"

    workspace = REPO / cfg.monitor.workspace  # an absolute path stays as it is
    workspace.mkdir(parents=True, exist_ok=True)
    evidently = _start(
        home, "evidently", [str(BIN / "evidently"), "ui", "--workspace", str(workspace), "--host", "127.0.0.1",
                            "--port", str(ports.evidently)], env
    )  # fmt: skip
    _wait("evidently", evidently, _get_ok(f"http://127.0.0.1:{ports.evidently}/api/projects"), home, 120)
    stack.urls["Evidently UI"] = f"http://127.0.0.1:{ports.evidently}"


def down(home: Path) -> list[str]:
    """Stop the processes `up` started (from their pid files), last started first. Returns their names."""
    home = home.resolve()
    stopped = []
    for name, pid in reversed(list(_pids(home).items())):
        if process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)  # each service leads its own session: its children go too
            deadline = time.time() + 30
            while process_alive(pid) and time.time() < deadline:
                _reap(pid)
                time.sleep(0.2)
            if process_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            stopped.append(name)
        (home / "pids" / f"{name}.pid").unlink()
    return stopped


def _reap(pid: int) -> None:
    """Collect a child of this process that has exited (when up and down run in one process, as in tests)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
