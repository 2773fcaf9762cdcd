"""This host's ports and processes: a loopback port nobody listens on, for a server or a launcher rendezvous to
take; whether a process still runs."""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_address() -> str:
    """Where this process runs: its Ray node's address inside a Ray cluster's worker or driver, else the host's
    name (Ray is not imported for it)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return str(ray.util.get_node_ip_address())
    return socket.gethostname()


CLUSTER_ENV = ("HF_", "MLFLOW_", "TRANSFORMERS_", "TOKENIZERS_", "LLMOPS_", "PYTHONWARNINGS")
"""Settings of this process's environment that its Ray job's workers get too (offline hub, tracking URI, ...)."""


def cluster_env() -> dict[str, str]:
    """This process's settings a Ray job started from it passes to its workers (`runtime_env.env_vars`)."""
    return {k: v for k, v in os.environ.items() if k.startswith(CLUSTER_ENV)}


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
