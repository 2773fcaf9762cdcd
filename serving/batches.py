"""OpenAI's Batch API over the served models: uploaded files, batches, and the runner that answers a batch.

A batch is a JSONL file of requests (`{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`),
answered in the background by this service's own routes: each line goes through the app as an HTTP request
would (in-process, no socket), with the key that created the batch, so scopes, limits, usage, guards, the
prediction log and the engine's continuous batching apply to it exactly as to live traffic, and live traffic is
interleaved with it. At most `serve.batches.concurrency` lines are in flight; a line refused with 429 waits its
Retry-After (up to a minute) and is sent again. The answers go to an output file (`batch_output`), the
refused lines to an error file, one line per request, in OpenAI's shapes, so `client.files.content(...)` reads
them.

Files and batches live under `serve.batches.dir` as JSON and JSONL, written whole (temporary file, then rename):
every worker of the service reads the same state, the worker that accepted a batch runs it, and its progress
(`request_counts`) is saved at least every second. A batch whose worker stopped before it finished is marked
`failed` when a worker of this host starts again (what it answered is kept in its output file); it is never run
twice. A batch still running at its `expires_at` (`serve.batches.completion_window_s` after it was created, 24h
as OpenAI's) sends no more lines: the lines in flight are answered, the rest go to the error file as
`batch_expired`, and it ends `expired`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmops.ports import process_alive

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
DONE = ("completed", "failed", "cancelled", "expired")
MAX_RETRY_AFTER_S = 60
FILE_ID = re.compile(r"file-[0-9a-f]{32}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


class BatchInputError(ValueError):
    """An input file that cannot be a batch: the batch fails validation with these errors."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors[0]["message"])
        self.errors = errors


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class BatchStore:
    """Files and batches on disk, shared by the service's workers."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.batches_dir = self.root / "batches"

    def ensure(self) -> None:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)

    # files
    def add_file(self, content: bytes, filename: str, purpose: str, owner: str) -> dict[str, Any]:
        self.ensure()
        file_id = f"file-{uuid.uuid4().hex}"
        _write(self.files_dir / f"{file_id}.data", content)
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "owner": owner,
        }
        _write(self.files_dir / f"{file_id}.json", json.dumps(meta).encode())
        return meta

    def file(self, file_id: str) -> dict[str, Any] | None:
        if not FILE_ID.fullmatch(file_id):
            return None  # not an id this store makes (nor a path out of it)
        path = self.files_dir / f"{file_id}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def content_path(self, file_id: str) -> Path:
        assert FILE_ID.fullmatch(file_id), file_id
        return self.files_dir / f"{file_id}.data"

    def files(self) -> list[dict[str, Any]]:
        if not self.files_dir.is_dir():
            return []
        return sorted((json.loads(p.read_text()) for p in self.files_dir.glob("file-*.json")), key=_newest_first)

    # batches
    def save(self, batch: dict[str, Any]) -> None:
        self.ensure()
        _write(self.batches_dir / f"{batch['id']}.json", json.dumps(batch).encode())

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        if not BATCH_ID.fullmatch(batch_id):
            return None
        path = self.batches_dir / f"{batch_id}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def batches(self) -> list[dict[str, Any]]:
        if not self.batches_dir.is_dir():
            return []
        return sorted((json.loads(p.read_text()) for p in self.batches_dir.glob("batch_*.json")), key=_newest_first)

    def fail_orphans(self) -> list[str]:
        """Batches this host was running when their worker stopped: marked failed (never run twice)."""
        failed = []
        for batch in self.batches():
            host, _, pid = str(batch.get("owner_process", "")).partition(":")
            if (
                batch["status"] in RUNNING
                and host == socket.gethostname()
                and pid.isdigit()
                and not process_alive(int(pid))
            ):
                self.save(stopped(batch))
                failed.append(batch["id"])
        return failed


def stopped(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch whose worker stopped before it finished, marked failed: what it answered stays in its output."""
    counts = batch["request_counts"]
    done = counts["completed"] + counts["failed"]
    return batch | {
        "status": "failed",
        "failed_at": int(time.time()),
        "errors": _errors(
            "worker_stopped",
            f"the serving process stopped while the batch ran ({done} of {counts['total']} requests answered, "
            "kept in its output and error files); create the batch again for the rest",
        ),
    }


def _newest_first(item: dict[str, Any]) -> tuple[int, str]:
    return (-int(item["created_at"]), item["id"])

    return True


def _errors(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": line}]}


def public(item: dict[str, Any]) -> dict[str, Any]:
    """A file or batch as the API shows it (without who owns it)."""
    return {k: v for k, v in item.items() if k not in ("owner", "owner_process")}


def read_requests(path: Path, endpoint: str, max_requests: int) -> list[dict[str, Any]]:
    """The requests of an input file, checked as OpenAI checks them before running any: JSON lines, each with a
    unique `custom_id`, `method` POST, the batch's `url` and an object `body`."""
    errors: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    seen: set[str] = set()
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue

            def bad(code: str, message: str, line: int = number) -> None:
                errors.append({"code": code, "message": f"line {line}: {message}", "param": None, "line": line})

            try:
                item = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                bad("invalid_json_line", f"not JSON ({error})")
                continue
            if not isinstance(item, dict):
                bad("invalid_request", "not a JSON object")
                continue
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                bad("missing_required_parameter", "no custom_id (a string naming the request)")
            elif custom_id in seen:
                bad("duplicate_custom_id", f"custom_id '{custom_id}' is used twice")
            else:
                seen.add(custom_id)
            if item.get("method", "POST") != "POST":
                bad("invalid_method", f"method '{item.get('method')}'; only POST")
            if item.get("url") != endpoint:
                bad("mismatched_url", f"url '{item.get('url')}' is not the batch's endpoint {endpoint}")
            if not isinstance(item.get("body"), dict):
                bad("invalid_request", "no body object")
            requests.append(item)
            if len(requests) > max_requests:
                bad("too_many_requests", f"more than {max_requests} requests (serve.batches.max_requests)")
                break
    if not requests and not errors:
        errors.append(
            {"code": "empty_file", "message": "the input file holds no requests", "param": None, "line": None}
        )
    if errors:
        raise BatchInputError(errors[:100])
    return requests


@dataclass
class _Progress:
    completed: int = 0
    failed: int = 0
    answered: set[str] = field(default_factory=set)
    """custom_ids with a line in the output or error file."""
    expired: bool = False
    """The batch reached its expires_at: its unsent requests are in the error file as `batch_expired`."""


def expired_line(custom_id: str) -> dict[str, Any]:
    """The error file's line for a request the batch did not send before it expired (OpenAI's shape)."""
    message = "This request could not be executed before the completion window expired."
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": "batch_expired", "message": message},
    }


class BatchRunner:
    """Runs the batches this worker accepted, each as an asyncio task sending its lines through `app`."""

    def __init__(self, store: BatchStore, concurrency: int, max_requests: int):
        self.store = store
        self.concurrency = concurrency
        self.max_requests = max_requests
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()

    def start(self, batch: dict[str, Any], app: Any, headers: dict[str, str]) -> None:
        batch["owner_process"] = f"{socket.gethostname()}:{os.getpid()}"
        self.store.save(batch)
        task = asyncio.create_task(self._run(batch, app, headers))
        self._tasks[batch["id"]] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch["id"], None))

    def cancel(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Stop sending the batch's lines: `cancelling` until the lines in flight are answered, then
        `cancelled`. A batch another worker runs is cancelled when that worker next saves its progress."""
        if batch["status"] in RUNNING:
            batch |= {"status": "cancelling", "cancelling_at": int(time.time())}
            self.store.save(batch)
            self._cancelled.add(batch["id"])
        return batch

    async def stop(self) -> None:
        """Stop running batches (the service is stopping): each is marked failed, what it answered published."""
        running = list(self._tasks.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _cancel_requested(self, batch_id: str) -> bool:
        if batch_id in self._cancelled:
            return True
        saved = self.store.batch(batch_id)
        return saved is not None and saved["status"] == "cancelling"

    async def _run(self, batch: dict[str, Any], app: Any, headers: dict[str, str]) -> None:
        try:
            requests = await asyncio.to_thread(
                read_requests, self.store.content_path(batch["input_file_id"]), batch["endpoint"], self.max_requests
            )
        except BatchInputError as error:
            batch |= {
                "status": "failed",
                "failed_at": int(time.time()),
                "errors": {"object": "list", "data": error.errors},
            }
            self.store.save(batch)
            return
        batch |= {
            "status": "in_progress",
            "in_progress_at": int(time.time()),
            "request_counts": {"total": len(requests), "completed": 0, "failed": 0},
        }
        self.store.save(batch)
        out_path = self.store.files_dir / f"{batch['id']}.output.partial"
        err_path = self.store.files_dir / f"{batch['id']}.errors.partial"
        progress = _Progress()
        lock = asyncio.Lock()
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
                with out_path.open("w") as out, err_path.open("w") as err:

                    async def answer(item: dict[str, Any]) -> None:
                        line, ok = await self._send(client, item, headers)
                        async with lock:
                            (out if ok else err).write(json.dumps(line) + "\n")
                            progress.answered.add(item["custom_id"])
                            if ok:
                                progress.completed += 1
                            else:
                                progress.failed += 1

                    saver = asyncio.create_task(self._save_progress(batch, progress))
                    expired = lambda: time.time() >= batch["expires_at"]  # noqa: E731
                    try:
                        stop = lambda: self._cancel_requested(batch["id"]) or expired()  # noqa: E731
                        await _bounded(requests, answer, self.concurrency, stop)
                    finally:
                        saver.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await saver
                    if expired() and len(progress.answered) < len(requests) and not self._cancel_requested(batch["id"]):
                        for item in requests:
                            if item["custom_id"] not in progress.answered:
                                err.write(json.dumps(expired_line(item["custom_id"])) + "\n")
                                progress.failed += 1
                        progress.expired = True
        finally:  # finished, cancelled, expired, or the service stopping: what was answered is published either way
            self._finish(batch["id"], len(requests), progress, out_path, err_path)

    def _finish(self, batch_id: str, total: int, progress: _Progress, out_path: Path, err_path: Path) -> None:
        cancelled = self._cancel_requested(batch_id)
        self._cancelled.discard(batch_id)
        batch = self.store.batch(batch_id) or {}
        batch |= {"finalizing_at": int(time.time())}
        batch["request_counts"] = {"total": total, "completed": progress.completed, "failed": progress.failed}
        owner = batch.get("owner", "")
        if out_path.stat().st_size or not err_path.stat().st_size:
            batch["output_file_id"] = self._publish(out_path, f"{batch_id}_output.jsonl", "batch_output", owner)
        if err_path.stat().st_size:
            batch["error_file_id"] = self._publish(err_path, f"{batch_id}_errors.jsonl", "batch_output", owner)
        for path in (out_path, err_path):
            path.unlink(missing_ok=True)
        now = int(time.time())
        done = progress.completed + progress.failed
        if cancelled:
            batch |= {"status": "cancelled", "cancelled_at": now}
        elif progress.expired:
            batch |= {"status": "expired", "expired_at": now}
        elif done == total:
            batch |= {"status": "completed", "completed_at": now}
        else:
            batch = stopped(batch)
        self.store.save(batch)
        log.info("batch %s %s: %s", batch_id, batch["status"], batch["request_counts"])

    def _publish(self, path: Path, filename: str, purpose: str, owner: str) -> str:
        return str(self.store.add_file(path.read_bytes(), filename, purpose, owner)["id"])

    async def _save_progress(self, batch: dict[str, Any], progress: _Progress) -> None:
        while True:
            await asyncio.sleep(1.0)
            saved = self.store.batch(batch["id"]) or batch
            counts = saved["request_counts"] | {"completed": progress.completed, "failed": progress.failed}
            self.store.save(saved | {"request_counts": counts})

    async def _send(
        self, client: httpx.AsyncClient, item: dict[str, Any], headers: dict[str, str]
    ) -> tuple[dict[str, Any], bool]:
        """One request's line for the output file (True) or the error file (False)."""
        body = item["body"] | {"stream": False}  # a batch's answers are whole
        while True:
            response = await client.post(item["url"], json=body, headers=headers)
            wait = response.headers.get("retry-after", "")
            if response.status_code == 429 and wait.isdigit() and int(wait) <= MAX_RETRY_AFTER_S:
                await asyncio.sleep(int(wait))  # the key's limits hold for its batches too: wait, then send again
                continue
            break
        try:
            answer = response.json()
        except ValueError:
            answer = {"error": response.text}
        ok = response.status_code < 400
        error = None if ok else {"code": answer.get("type", str(response.status_code)), "message": answer.get("error")}
        line = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": item["custom_id"],
            "response": {
                "status_code": response.status_code,
                "request_id": response.headers.get("x-request-id"),
                "body": answer,
            },
            "error": error,
        }
        return line, ok


async def _bounded(
    items: list[dict[str, Any]],
    run: Callable[[dict[str, Any]], Coroutine[Any, Any, None]],
    concurrency: int,
    stopped: Callable[[], bool],
) -> None:
    """`run` over `items`, at most `concurrency` at once, sending no more once `stopped()` says so."""
    pending = iter(items)
    running: set[asyncio.Task[None]] = set()
    try:
        await _drain(pending, running, run, concurrency, stopped)
    finally:  # cancelled (the service stopping): the requests in flight go with it
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _drain(
    pending: Any,
    running: set[asyncio.Task[None]],
    run: Callable[[dict[str, Any]], Coroutine[Any, Any, None]],
    concurrency: int,
    stopped: Callable[[], bool],
) -> None:
    checked_at = 0.0
    while True:
        now = time.monotonic()
        stop = now - checked_at > 0.5 and stopped()
        checked_at = now if now - checked_at > 0.5 else checked_at
        while not stop and len(running) < concurrency:
            item = next(pending, None)
            if item is None:
                break
            running.add(asyncio.create_task(run(item)))
        if not running:
            return
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        running -= done
        for task in done:
            task.result()
