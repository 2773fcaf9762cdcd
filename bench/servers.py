"""Starting and stopping the servers a serving benchmark compares: one process at a time, on a free port."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmops.ports import free_port

PIDS: dict[str, int] = {}
"""label -> process id of each server `running` started (for its memory)."""


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


@contextmanager
def running(label: str, command: list[str], ready_path: str, env: dict[str, str], workdir: Path) -> Iterator[str]:
    """The server of `command` (`{port}` replaced) started, ready, and stopped at the end; yields its base URL."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in command]
    print(f"[{label}] {' '.join(command)}", flush=True)
    with (workdir / f"{label.replace(' ', '_').replace('/', '_')}.log").open("w") as log:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        PIDS[label] = proc.pid
        try:
            wait_ready(f"http://127.0.0.1:{port}{ready_path}", proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
