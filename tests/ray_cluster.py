"""A real Ray cluster of several hosts on this one machine, for the cluster tests.

Each worker node is a host of its own: a network namespace joined to this one by a veth pair, with its own
address (10.<a>.<b>.2, .3, ...); the head node listens on this side's end (10.<a>.<b>.1). Where namespaces cannot
be made (no root, no iproute2), the nodes are raylets on loopback with ports of their own, and `hosts` says so.
Every node is a `ray start --block` in a process group of its own, so a test kills a node the way a machine dies
(SIGKILL to the group), and the teardown leaves no Ray process and no namespace behind.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
ENV = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


_RANDOM = random.SystemRandom()
"""Ports and subnets: not from `random`'s shared generator, which training seeds, so two pytest workers that
trained would draw the same port (and bridge name) for their clusters."""


@dataclass
class Node:
    address: str
    """The node's IP address (the host it stands for)."""
    process: subprocess.Popen
    namespace: str | None = None

    def kill(self) -> None:
        """The node dies at once, as a machine that loses power: its raylet and everything in its group."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@dataclass
class Cluster:
    address: str
    """The head's GCS address (`ray.init(address=...)`, `RAY_ADDRESS`)."""
    head: Node
    workers: list[Node]
    hosts: str
    """`namespaces` (hosts of their own) or `loopback` (raylets on 127.0.0.1)."""
    temp_dir: Path
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return ENV | {"RAY_ADDRESS": self.address}


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def _namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"llmops-probe-{os.getpid()}"
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "netns", "delete", name)
        return True
    except (subprocess.CalledProcessError, OSError):
        return False


def _start(
    args: list[str], log: Path, namespace: str | None, interface: str, hidden: tuple[Path, ...] = ()
) -> subprocess.Popen:
    """A node's `ray start`; `interface`: the one its address is on, where gloo (DDP on CPUs) must listen too (the
    machine's name resolves to loopback here, which the other hosts cannot reach). `hidden`: folders this node
    does not see (a mount namespace of its own, an empty tmpfs over each), as a machine without the shared disk."""
    command = [RAY, "start", "--block", "--disable-usage-stats", *args]
    if hidden:
        mounts = " && ".join(f"mount -t tmpfs hidden {shlex.quote(str(folder))}" for folder in hidden)
        script = f"{mounts} && exec {shlex.join(command)}"
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    with log.open("wb") as out:
        return subprocess.Popen(
            [*prefix, *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV | {"GLOO_SOCKET_IFNAME": interface},
            start_new_session=True,
        )


def _wait_for_nodes(address: str, count: int, timeout: float = 120) -> None:
    """Until `count` nodes are alive (asked from a fresh process: a driver here would pin Ray's state)."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-c", probe, address], capture_output=True, text=True, env=ENV, timeout=60
        )
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {count} nodes in {timeout:.0f} s")


@contextmanager
def ray_cluster(workers: int = 1, cpus: int = 1, hidden: tuple[Path, ...] = ()) -> Iterator[Cluster]:
    """A head and `workers` worker nodes of `cpus` CPUs each, torn down on exit; the worker nodes do not see the
    `hidden` folders (hosts of their own only: `hosts` is then `namespaces`, or the cluster is not started)."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    port = _RANDOM.randint(20000, 29999)
    namespaces, links, nodes = [], [], []
    hosts = "namespaces" if _namespaces_work() else "loopback"
    if hidden and hosts != "namespaces":
        raise RuntimeError("hiding folders from a node needs hosts of their own (root and iproute2)")
    subnet = f"10.{_RANDOM.randint(100, 250)}.{_RANDOM.randint(0, 250)}"
    try:
        if hosts == "namespaces":
            head_ip = f"{subnet}.1"
            _run("ip", "link", "add", f"llb{port}", "type", "bridge")
            _run("ip", "addr", "add", f"{head_ip}/24", "dev", f"llb{port}")
            _run("ip", "link", "set", f"llb{port}", "up")
            links.append(f"llb{port}")
        else:
            head_ip = "127.0.0.1"
        address = f"{head_ip}:{port}"
        head = Node(
            head_ip,
            _start(
                [
                    "--head",
                    f"--node-ip-address={head_ip}",
                    f"--port={port}",
                    f"--num-cpus={cpus}",
                    "--include-dashboard=false",
                    # not Ray's fixed defaults (10001, 8265, 52365): two test clusters at once (pytest workers)
                    f"--ray-client-server-port={port + 1}",
                    f"--dashboard-port={port + 2}",
                    f"--dashboard-agent-listen-port={port + 3}",
                    f"--temp-dir={temp}",
                ],
                temp / "head.log",
                None,
                f"llb{port}" if hosts == "namespaces" else "lo",
            ),
        )
        nodes.append(head)
        workers_started = []
        for i in range(workers):
            namespace = None
            if hosts == "namespaces":
                namespace, ip = f"llmops-{port}-{i}", f"{subnet}.{i + 2}"
                near, far = f"llh{port}{i}"[:15], f"llw{port}{i}"[:15]
                _run("ip", "netns", "add", namespace)
                namespaces.append(namespace)
                _run("ip", "link", "add", near, "type", "veth", "peer", "name", far)
                links.append(near)
                _run("ip", "link", "set", near, "master", f"llb{port}")
                _run("ip", "link", "set", near, "up")
                _run("ip", "link", "set", far, "netns", namespace)
                _run("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{ip}/24", "dev", far)
                _run("ip", "netns", "exec", namespace, "ip", "link", "set", far, "up")
                _run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
                own, interface = [f"--node-ip-address={ip}"], far
            else:
                ip = "127.0.0.1"
                base = port + 100 * (i + 1)
                own = [
                    f"--node-ip-address={ip}",
                    f"--node-manager-port={base}",
                    f"--object-manager-port={base + 1}",
                    f"--dashboard-agent-listen-port={base + 2}",
                    f"--min-worker-port={base + 10}",
                    f"--max-worker-port={base + 60}",
                ]
                interface = "lo"
            node = Node(
                ip,
                _start(
                    [f"--address={address}", f"--num-cpus={cpus}", f"--temp-dir={temp}", *own],
                    temp / f"worker-{i}.log",
                    namespace,
                    interface,
                    hidden,
                ),
                namespace,
            )
            nodes.append(node)
            workers_started.append(node)
        _wait_for_nodes(address, 1 + workers)
        yield Cluster(address, head, workers_started, hosts, temp, namespaces, links)
    finally:
        for node in reversed(nodes):
            node.kill()
        # a raylet's workers end with it; any that outlive it carry the session's folder in their command line
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
        for namespace in namespaces:
            subprocess.run(["ip", "netns", "delete", namespace], check=False, capture_output=True)
        for link in links:
            subprocess.run(["ip", "link", "delete", link], check=False, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def node_logs(cluster: Cluster) -> str:
    """The nodes' `ray start` output, for a failing test's message."""
    return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(cluster.temp_dir.glob("*.log")))
