"""Loopback ports: one that nobody listens on now, for a server or a launcher rendezvous to take."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
