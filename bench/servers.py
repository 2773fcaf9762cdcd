"""Starting and stopping the servers a serving benchmark compares: one process at a time, on a free port."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

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


async def read_stream(
    response: aiohttp.ClientResponse, text_of: Callable[[dict[str, Any]], str | None]
) -> tuple[float | None, int, int | None]:
    """An OpenAI-style stream read to its end: when its first text came (perf_counter), how many chunks carried
    text (`text_of` a choice), and the completion tokens its usage reported (None without usage)."""
    first, chunks, usage = None, 0, None
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: ") :])
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            if text_of(choice):
                first = first or time.perf_counter()
                chunks += 1
    return first, chunks, usage


async def streamed_chat(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed `/v1/chat/completions` answer: time to first token, end to end, and its completion tokens
    (from its usage when the server gives one, else its chunks with text), or its error status."""
    start = time.perf_counter()
    async with session.post(f"{base}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            await response.read()
            return {"error": response.status}
        first, tokens, usage = await read_stream(response, lambda choice: (choice.get("delta") or {}).get("content"))
    done = time.perf_counter()
    return {"ttft": (first or done) - start, "e2e": done - start, "tokens": usage if usage is not None else tokens}


async def timed_load(
    url: str,
    bodies: list[bytes] | None,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    key: str | None = None,
) -> dict[str, Any]:
    """Closed loop: `concurrency` workers each POST a body (GET the URL where `bodies` is None) and wait for the
    answer, from `warmup_s` for `duration_s`."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors, counter
            while (now := loop.time()) < stop_at:
                request = (
                    session.get(url)
                    if bodies is None
                    else session.post(url, data=bodies[counter % len(bodies)], headers=headers)
                )
                counter += 1
                async with request as response:
                    await response.read()
                    ok = response.status == 200
                done = loop.time()
                if now >= measure_from:
                    if ok:
                        latencies.append(done - now)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "throughput": len(latencies) / duration_s,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }


async def closed_loop(
    concurrency: int, requests: int, one: Callable[[int], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """One warm-up request per slot (`one(0)` .. `one(c - 1)`), then `requests` more (`one(c)`, ...) with
    `concurrency` in flight; their tokens/s, time to first token and end-to-end latency (each result: `ttft`,
    `e2e`, `tokens`, or `error`)."""
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    results: list[dict[str, Any]] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            results.append(await one(i + concurrency))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = np.array([r["ttft"] for r in ok]) * 1000
    e2e = np.array([r["e2e"] for r in ok]) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "mean_tokens": float(np.mean([r["tokens"] for r in ok])) if ok else 0.0,
        "ttft_p50_ms": float(np.percentile(ttft, 50)) if ok else math.nan,
        "ttft_p99_ms": float(np.percentile(ttft, 99)) if ok else math.nan,
        "e2e_p99_ms": float(np.percentile(e2e, 99)) if ok else math.nan,
    }


class _OtlpSink(BaseHTTPRequestHandler):
    spans = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        request = ExportTraceServiceRequest.FromString(body)
        with _OtlpSink.lock:
            _OtlpSink.spans += sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        self._answer("application/x-protobuf", b"")

    def do_GET(self) -> None:
        """The spans received so far."""
        self._answer("text/plain", str(_OtlpSink.spans).encode())

    def _answer(self, content_type: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def otlp_sink() -> Iterator[tuple[str, Callable[[], int]]]:
    """An OTLP/HTTP trace receiver on a free loopback port that decodes and counts the spans it is sent, then
    drops them (what a collector's receiver does before its pipeline): its `/v1/traces` URL and a function that
    reads its count. It is a process of its own, as a collector is: decoding spans on a thread of the load
    generator's process would slow the load (they share its GIL), which would be charged to the traced server."""
    sink = subprocess.Popen([sys.executable, __file__, "otlp-sink"], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        base = f"http://127.0.0.1:{int(sink.stdout.readline())}"

        def spans() -> int:
            with urllib.request.urlopen(base, timeout=10) as response:
                return int(response.read())

        yield f"{base}/v1/traces", spans
    finally:
        sink.terminate()
        sink.wait(timeout=30)


if __name__ == "__main__" and sys.argv[1:] == ["otlp-sink"]:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _OtlpSink)
    print(receiver.server_port, flush=True)
    receiver.serve_forever()
