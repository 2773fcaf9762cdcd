"""OpenAI's Batch API through the official `openai` client: files uploaded, batches of chat and completion
requests answered in the background by the served tiny generator (the same answers as asked one by one), bad
lines in the error file, malformed files failed with the line named, cancellation, keys that see only their
own batches, and a batch whose worker stopped marked failed. A real MLflow registry of tiny models."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import openai
import pytest

from llmops.config import LlmopsConfig, RegistryConfig, ServeConfig
from llmops.gateway import GatewayStore
from serving.batches import BatchStore
from tests.http_service import in_process, openai_client
from tests.tiny_registry import register_generators, set_alias

GENERATOR = "tiny-generator"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = register_generators(tmp_path_factory.mktemp("batches"), GENERATOR, seeds=[1])
    set_alias(uri, GENERATOR, "champion", "1")
    return uri


def config(tmp_path: Path, **serve: Any) -> LlmopsConfig:
    settings = {
        "models": [GENERATOR],
        "model_cache": str(tmp_path / "served"),
        "prediction_log": str(tmp_path / "predictions.db"),
        "gateway_store": str(tmp_path / "gateway.db"),
        "batches": {"dir": str(tmp_path / "batches"), "concurrency": 4},
    } | serve
    return LlmopsConfig(registry=RegistryConfig(model_name=GENERATOR), serve=ServeConfig(**settings))


def jsonl(lines: list[dict[str, Any]]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())


def chat(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    body = {"model": GENERATOR, "messages": [{"role": "user", "content": content}], "max_tokens": 6} | body
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


async def finished(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 120) -> Any:
    for _ in range(int(timeout * 10)):
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        await asyncio.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout} s")


async def lines_of(client: openai.AsyncOpenAI, file_id: str) -> dict[str, dict[str, Any]]:
    content = await client.files.content(file_id)
    return {line["custom_id"]: line for line in map(json.loads, content.text.splitlines())}


async def test_a_batch_of_chats_is_answered_as_the_same_chats_asked_one_by_one(store: str, tmp_path: Path) -> None:
    prompts = ["write a positive tweet about coachella", "classify the sentiment of this tweet: lost my bag"]
    requests = [chat(f"chat-{i}", prompts[i % 2], temperature=0, seed=i) for i in range(12)]
    requests.append(chat("wrong-model", "hello", model="no-such-model"))
    async with in_process(config(tmp_path), store) as (_, app):
        client = openai_client(app)
        upload = await client.files.create(file=("requests.jsonl", jsonl(requests)), purpose="batch")
        created = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "t"}
        )
        done = await finished(client, created.id)
        answers = await lines_of(client, done.output_file_id)
        errors = await lines_of(client, done.error_file_id)
        direct = await client.chat.completions.create(**requests[3]["body"])
        listed = await client.batches.list()
        files = await client.files.list()

    assert created.status == "validating" and upload.purpose == "batch" and upload.bytes > 0
    assert done.status == "completed" and done.metadata == {"job": "t"}
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (13, 12, 1)
    assert set(answers) == {f"chat-{i}" for i in range(12)}
    line = answers["chat-3"]
    assert line["response"]["status_code"] == 200 and line["error"] is None and line["response"]["request_id"]
    body = line["response"]["body"]
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content  # the same answer
    refused = errors["wrong-model"]
    assert refused["response"]["status_code"] == 404 and refused["error"]["code"] == "not_found"
    assert [b.id for b in listed.data] == [created.id]
    assert {f.purpose for f in files.data} == {"batch", "batch_output"} and len(files.data) == 3


async def test_a_malformed_file_fails_validation_naming_its_lines(store: str, tmp_path: Path) -> None:
    lines = [chat("a", "hello"), chat("a", "again"), {**chat("b", "hi"), "url": "/v1/completions"}]
    async with in_process(config(tmp_path), store) as (_, app):
        client = openai_client(app)
        upload = await client.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
        created = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await finished(client, created.id)
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
        with pytest.raises(openai.UnprocessableEntityError):
            await client.files.create(file=("x.jsonl", jsonl([chat("a", "b")])), purpose="fine-tune")
        empty = await client.files.create(file=("empty.jsonl", io.BytesIO(b"")), purpose="batch")
        emptied = await client.batches.create(
            input_file_id=empty.id, endpoint="/v1/completions", completion_window="24h"
        )
        nothing = await finished(client, emptied.id)
    assert done.status == "failed" and done.output_file_id is None
    found = {(e.code, e.line) for e in done.errors.data}
    assert found == {("duplicate_custom_id", 2), ("mismatched_url", 3)}
    assert nothing.status == "failed" and [e.code for e in nothing.errors.data] == ["empty_file"]


async def test_a_cancelled_batch_sends_no_more_and_keeps_what_was_answered(store: str, tmp_path: Path) -> None:
    requests = [chat(f"c{i}", "write a tweet", max_tokens=24) for i in range(300)]
    async with in_process(config(tmp_path, batches={"dir": str(tmp_path / "b"), "concurrency": 1}), store) as (_, app):
        client = openai_client(app)
        upload = await client.files.create(file=("many.jsonl", jsonl(requests)), purpose="batch")
        created = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        for _ in range(200):
            if (await client.batches.retrieve(created.id)).request_counts.completed >= 2:
                break
            await asyncio.sleep(0.05)
        cancelling = await client.batches.cancel(created.id)
        done = await finished(client, created.id)
        answered = await lines_of(client, done.output_file_id)
    assert cancelling.status == "cancelling"
    assert done.status == "cancelled"
    assert 2 <= done.request_counts.completed == len(answered) < 300


async def test_a_batch_past_its_window_expires_keeping_what_it_answered(store: str, tmp_path: Path) -> None:
    requests = [chat(f"e{i}", "write a tweet", max_tokens=24) for i in range(300)]
    batches = {"dir": str(tmp_path / "b"), "concurrency": 1, "completion_window_s": 2}
    async with in_process(config(tmp_path, batches=batches), store) as (_, app):
        client = openai_client(app)
        upload = await client.files.create(file=("many.jsonl", jsonl(requests)), purpose="batch")
        created = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await finished(client, created.id)
        answered = await lines_of(client, done.output_file_id)
        unanswered = await lines_of(client, done.error_file_id)
    assert created.expires_at == created.created_at + 2
    assert done.status == "expired" and done.expired_at >= done.expires_at
    assert 0 < done.request_counts.completed == len(answered) < 300
    # every request once: answered, or in the error file as expired, never sent
    assert sorted(answered | unanswered) == sorted(r["custom_id"] for r in requests)
    assert done.request_counts.failed == len(unanswered) == 300 - len(answered)
    assert {line["error"]["code"] for line in unanswered.values()} == {"batch_expired"}
    assert all(line["response"] is None for line in unanswered.values())


async def test_keys_see_only_their_own_files_and_batches(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMOPS_API_KEYS", raising=False)
    gateway = GatewayStore(tmp_path / "gateway.db")
    mine, _ = gateway.create("team-a", models=[GENERATOR])
    theirs, _ = gateway.create("team-b", models=[GENERATOR])
    async with in_process(config(tmp_path), store) as (_, app):
        a, b = openai_client(app), openai_client(app)
        a.api_key, b.api_key = mine, theirs
        upload = await a.files.create(file=("r.jsonl", jsonl([chat("x", "hello")])), purpose="batch")
        with pytest.raises(openai.NotFoundError):  # another key's file is not there for it
            await b.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        created = await a.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await finished(a, created.id)
        with pytest.raises(openai.NotFoundError):
            await b.batches.retrieve(created.id)
        assert (await b.batches.list()).data == []
    assert done.status == "completed" and done.request_counts.completed == 1
    usage = {(r["key_name"], r["model"]): r for r in gateway.usage()}
    assert usage[("team-a", GENERATOR)]["requests"] >= 1  # the batch's request counted to the key that sent it


ORPHAN, LIVE = f"batch_{'0' * 32}", f"batch_{'1' * 32}"


def test_a_batch_whose_worker_stopped_is_failed_not_run_twice(tmp_path: Path) -> None:
    batches = BatchStore(tmp_path)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    base = {"object": "batch", "endpoint": "/v1/completions", "input_file_id": "file-x", "completion_window": "24h",
            "created_at": 1, "request_counts": {"total": 10, "completed": 4, "failed": 1}}  # fmt: skip
    batches.save(base | {"id": ORPHAN, "status": "in_progress", "owner_process": f"{socket.gethostname()}:{dead}"})
    batches.save(base | {"id": LIVE, "status": "in_progress", "owner_process": f"{socket.gethostname()}:{os.getpid()}"})
    assert batches.fail_orphans() == [ORPHAN]
    orphan = batches.batch(ORPHAN)
    assert orphan is not None and orphan["status"] == "failed"
    assert "5 of 10 requests answered" in orphan["errors"]["data"][0]["message"]
    assert batches.batch(LIVE)["status"] == "in_progress"  # type: ignore[index]
