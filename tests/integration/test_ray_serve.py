"""`llmops serve --ray` on a real two-host Ray cluster (the worker node a network namespace of its own,
tests/ray_cluster.py): the service as Ray Serve replicas of one CPU each, scaling from one to two under load
(one on each host), losing no request when a replica is killed mid-load, every replica writing the one
PostgreSQL prediction log (a real server on the hosts' network)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from llmops.ports import free_port
from llmops.predlog import open_store
from tests.conftest import TINY_CONFIG
from tests.http_service import server_process
from tests.postgres import postgres_server
from tests.ray_cluster import node_logs, ray_cluster
from tests.tiny_registry import register_generators, register_versions, set_alias

BIN = Path(sys.executable).parent
NAME = "served"
TEXTS = ["the flight was great", "lost my bag again", "the crew was kind"]


@pytest.mark.slow
def test_replicas_scale_to_both_hosts_lose_no_request_to_a_killed_one_and_log_to_postgres(tmp_path: Path) -> None:
    uri = register_versions(tmp_path, NAME, [1])
    set_alias(uri, NAME, "champion", "1")
    with ray_cluster(workers=1, cpus=1) as cluster, postgres_server(cluster.head.address) as log_url:
        base = f"http://{cluster.head.address}:{free_port()}"
        settings = [
            f"registry.tracking_uri={uri}", f"registry.model_name={NAME}", f"serve.models=[{NAME}]",
            f"serve.prediction_log={log_url}", "serve.gateway_store=null", "serve.threads=1",
            "serve.min_replicas=1", "serve.max_replicas=2", "serve.ray.target_ongoing_requests=1",
            "serve.ray.upscale_delay_s=1", "serve.ray.downscale_delay_s=600",
        ]  # fmt: skip
        command = [str(BIN / "llmops"), "serve", "--ray", "--config", str(TINY_CONFIG),
                   "--host", cluster.head.address, "--port", base.rsplit(":", 1)[1],
                   *[arg for setting in settings for arg in ("--set", setting)]]  # fmt: skip
        answers: list[tuple[float, int, str, str]] = []  # (time, status, replica, request id)
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=base, timeout=120) as http:
                while not stop.is_set():
                    response = http.post("/v1/predict", json={"texts": TEXTS})
                    replica = response.headers.get("x-llmops-replica", "")
                    request_id = response.headers.get("x-request-id", "")
                    answers.append((time.monotonic(), response.status_code, replica, request_id))

        try:
            with server_process(command, tmp_path / "serve.log", f"{base}/readyz", cluster.env, cwd=tmp_path):
                clients = [threading.Thread(target=client) for _ in range(8)]
                for thread in clients:
                    thread.start()
                # Under load the autoscaler adds the second replica; one CPU a host puts it on the other host.
                deadline = time.monotonic() + 240
                while len({a[2].split("/")[0] for a in answers if a[1] == 200}) < 2:
                    assert time.monotonic() < deadline, f"no second replica: {answers[-3:]}"
                    time.sleep(1)
                on_worker = next(a[2] for a in reversed(answers) if a[2].startswith(cluster.workers[0].address))
                time.sleep(3)
                killed_at = time.monotonic()
                os.kill(int(on_worker.split("/")[1]), signal.SIGKILL)  # the replica's process dies mid-load
                time.sleep(15)
                stop.set()
                for thread in clients:
                    thread.join(timeout=180)
        finally:
            stop.set()
            logs = node_logs(cluster)
        statuses = {a[1] for a in answers}
        assert statuses == {200}, ([a for a in answers if a[1] != 200][:5], logs[-3000:])
        after = [a for a in answers if a[0] > killed_at]
        assert len(after) > 10 and on_worker not in {a[2] for a in after[8:]}  # answered by the others since
        # Every replica wrote the one log: rows of requests each host answered are there.
        logged = set(open_store(log_url).read_predictions()["request_id"])
        for host in (cluster.head.address, cluster.workers[0].address):
            mine = {a[3] for a in answers if a[2].startswith(host + "/") and a[0] < killed_at - 3}
            assert mine and mine & logged, host


@pytest.mark.slow
def test_a_streamed_chat_streams_through_the_front_as_it_is_generated(tmp_path: Path) -> None:
    uri = register_generators(tmp_path, "gen", [1])
    set_alias(uri, "gen", "champion", "1")
    with ray_cluster(workers=0, cpus=2) as cluster:
        base = f"http://{cluster.head.address}:{free_port()}"
        settings = [f"registry.tracking_uri={uri}", "registry.model_name=gen", "serve.models=[gen]",
                    "serve.gateway_store=null", "serve.threads=1"]  # fmt: skip
        command = [str(BIN / "llmops"), "serve", "--ray", "--config", str(TINY_CONFIG),
                   "--host", cluster.head.address, "--port", base.rsplit(":", 1)[1],
                   *[arg for setting in settings for arg in ("--set", setting)]]  # fmt: skip
        chat = [{"role": "user", "content": "a tweet"}]
        body = {"model": "gen", "messages": chat, "max_tokens": 12, "stream": True, "temperature": 0}
        with server_process(command, tmp_path / "serve.log", f"{base}/readyz", cluster.env, cwd=tmp_path):
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
                assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["x-llmops-replica"].startswith(cluster.head.address + "/")
                events = [line for line in response.iter_lines() if line.startswith("data: ")]
            whole = httpx.post(f"{base}/v1/chat/completions", json=body | {"stream": False}, timeout=60).json()
    assert events[-1] == "data: [DONE]" and len(events) > 3  # one event per token or so, not one blob
    streamed = "".join(json.loads(event[6:])["choices"][0]["delta"].get("content") or "" for event in events[:-1])
    assert streamed == whole["choices"][0]["message"]["content"]  # greedy: the same answer, streamed or whole
