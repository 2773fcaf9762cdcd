"""Waiting for a served app over real HTTP (a process or a uvicorn thread)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


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
