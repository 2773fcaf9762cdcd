"""Generators served in-process (ASGI transport, real lifespan) next to a classifier, against a real MLflow
registry of tiny models: OpenAI's routes through the official `openai` client, streamed and not, Triton's
generate extension, continuous batching under concurrency, disconnects, back-pressure, an alias switch while
streaming, and every bad input a 4xx.

Versions of `tiny-generator`: 1 and 2 (different weights), 3 cannot load. `tiny-sentiment` version 1 is a
classifier.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmops.config import LlmopsConfig, RegistryConfig, ServeConfig
from serving.app import create_app
from tests.http_service import in_process, openai_client, served_in_thread
from tests.tiny_registry import register_generators, register_versions, set_alias

GENERATOR, CLASSIFIER = "tiny-generator", "tiny-sentiment"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("generation-serving")
    uri = register_versions(root, CLASSIFIER, seeds=[1])
    register_generators(root, GENERATOR, seeds=[1, 2, 3], uri=uri, broken={3})
    set_alias(uri, CLASSIFIER, "champion", "1")
    return uri


@pytest.fixture
def v1(store: str) -> str:
    set_alias(store, GENERATOR, "champion", "1")
    return store


@asynccontextmanager
async def serving(store: str, tmp_path: Path, **serve: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    settings = {
        "models": [CLASSIFIER, GENERATOR],
        "poll_interval_s": 0.1,
        "flush_interval_s": 0.2,
        "model_cache": str(tmp_path / "served"),
        "prediction_log": str(tmp_path / "predictions.db"),
    } | serve
    cfg = LlmopsConfig(registry=RegistryConfig(model_name=CLASSIFIER), serve=ServeConfig(**settings))
    async with in_process(cfg, store) as served:
        yield served


def complete(prompt: str, max_tokens: int, **more: Any) -> dict[str, Any]:
    return {"model": GENERATOR, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0} | more


async def sse(response: httpx.Response) -> list[Any]:
    """The data of every server-sent event, parsed ('[DONE]' kept as the string)."""
    out = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --- the OpenAI client, unchanged ------------------------------------------------------------------------


async def test_the_openai_client_lists_completes_and_chats(v1: str, tmp_path: Path) -> None:
    async with serving(v1, tmp_path) as (_, app):
        client = openai_client(app)
        assert {m.id for m in (await client.models.list()).data} == {CLASSIFIER, GENERATOR}
        done = await client.completions.create(model=GENERATOR, prompt="write a tweet", max_tokens=6, temperature=0)
        assert done.object == "text_completion" and done.system_fingerprint == f"llmops-{GENERATOR}-v1"
        (choice,) = done.choices
        assert choice.finish_reason in {"stop", "length"} and choice.text
        assert done.usage.completion_tokens <= 6 and done.usage.prompt_tokens > 0
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        chat = await client.chat.completions.create(
            model=GENERATOR, messages=[{"role": "user", "content": "classify: great crew"}], max_tokens=4
        )
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4


async def test_a_streamed_answer_is_the_whole_answer_in_pieces(v1: str, tmp_path: Path) -> None:
    async with serving(v1, tmp_path) as (_, app):
        client = openai_client(app)
        whole = await client.completions.create(model=GENERATOR, prompt="write a tweet", max_tokens=12, temperature=0)
        stream = await client.completions.create(
            model=GENERATOR,
            prompt="write a tweet",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        assert "".join(pieces) == whole.choices[0].text and finish == whole.choices[0].finish_reason
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
        chat = await client.chat.completions.create(
            model=GENERATOR, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True
        )
        deltas = [c.choices[0] async for c in chat]
        assert deltas[0].delta.role == "assistant" and deltas[-1].finish_reason in {"stop", "length"}


async def test_sse_ends_with_done(v1: str, tmp_path: Path) -> None:
    async with serving(v1, tmp_path) as (client, _):
        async with client.stream("POST", "/v1/completions", json=complete("hello", 5, stream=True)) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = await sse(response)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in {"stop", "length"}


async def test_v2_metadata_and_infer_answer_for_the_model_named(v1: str, tmp_path: Path) -> None:
    infer = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    async with serving(v1, tmp_path) as (client, _):
        generator = (await client.get(f"/v2/models/{GENERATOR}")).json()
        classifier = (await client.get(f"/v2/models/{CLASSIFIER}")).json()
        ready = await client.get(f"/v2/models/{GENERATOR}/ready")
        wrong_kind = await client.post(f"/v2/models/{GENERATOR}/infer", json=infer)
        scored = await client.post(f"/v2/models/{CLASSIFIER}/infer", json=infer)
    assert [t["name"] for t in generator["inputs"]] == ["text_input"] and generator["versions"] == ["1"]
    assert [t["name"] for t in classifier["outputs"]] == ["label", "probabilities"]
    assert ready.json() == {"name": GENERATOR, "ready": True}
    assert (wrong_kind.status_code, wrong_kind.json()["type"]) == (404, "wrong_model_kind")  # was: the classifier's
    assert scored.status_code == 200 and scored.json()["model_name"] == CLASSIFIER


async def test_min_tokens_beyond_the_answer_is_capped_like_max_tokens(v1: str, tmp_path: Path) -> None:
    async with serving(v1, tmp_path) as (client, _):
        capped = await client.post("/v1/completions", json=complete("hello", 4, min_tokens=50))
    assert capped.status_code == 200, capped.text
    assert capped.json()["usage"]["completion_tokens"] == 4 and capped.json()["choices"][0]["finish_reason"] == "length"


async def test_triton_generate_and_generate_stream(v1: str, tmp_path: Path) -> None:
    async with serving(v1, tmp_path) as (client, _):
        body = {"text_input": "write a tweet", "parameters": {"max_tokens": 6}}
        whole = (await client.post(f"/v2/models/{GENERATOR}/generate", json=body)).json()
        assert whole["model_name"] == GENERATOR and whole["model_version"] == "1"
        assert whole["completion_tokens"] <= 6 and whole["finish_reason"] in {"stop", "length"}
        async with client.stream("POST", f"/v2/models/{GENERATOR}/generate_stream", json=body) as response:
            events = await sse(response)
        assert "".join(e["text_output"] for e in events) == whole["text_output"]
        assert events[-1]["completion_tokens"] == whole["completion_tokens"]


# --- continuous batching ----------------------------------------------------------------------------------


async def test_many_streams_at_once_keep_their_own_text_and_counts(v1: str, tmp_path: Path) -> None:
    prompts = [f"write tweet number {i} about coachella" for i in range(12)]
    lengths = [2, 17, 5, 11, 3, 23, 8, 1, 14, 6, 19, 9]
    async with serving(v1, tmp_path, max_running=4) as (client, _):
        alone = []
        for prompt, n in zip(prompts, lengths, strict=True):
            alone.append((await client.post("/v1/completions", json=complete(prompt, n))).json())

        async def streamed(prompt: str, n: int) -> tuple[str, int]:
            async with client.stream(
                "POST", "/v1/completions", json=complete(prompt, n, stream=True, stream_options={"include_usage": True})
            ) as r:
                events = [e for e in await sse(r) if e != "[DONE]"]
            return "".join(c["text"] for e in events for c in e["choices"]), events[-1]["usage"]["completion_tokens"]

        together = await asyncio.gather(*(streamed(p, n) for p, n in zip(prompts, lengths, strict=True)))
    for (text, tokens), expected in zip(together, alone, strict=True):
        assert text == expected["choices"][0]["text"]  # no cross-talk between the sequences of one batch
        assert tokens == expected["usage"]["completion_tokens"]


async def test_a_client_that_goes_away_frees_its_slot(v1: str, tmp_path: Path) -> None:
    serve = ServeConfig(
        models=[CLASSIFIER, GENERATOR],
        max_running=1,
        max_new_tokens=4000,
        model_cache=str(tmp_path / "served"),
        prediction_log=str(tmp_path / "predictions.db"),
    )
    cfg = LlmopsConfig(registry=RegistryConfig(model_name=CLASSIFIER), serve=serve)
    # over real HTTP: the in-process transport reads an answer whole, so no client could hang up mid-stream there
    with served_in_thread(create_app(cfg, tracking_uri=v1)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            endless = complete("write forever", 4000, stream=True)
            async with client.stream("POST", "/v1/completions", json=endless) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break  # one chunk, then the client hangs up
            # the one slot is free long before 4000 tokens could be written (about 25 s on these cores)
            answered = await asyncio.wait_for(client.post("/v1/completions", json=complete("hi", 3)), timeout=10)
            assert answered.status_code == 200
            # the engine sets the gauge after the step that ended the answer, so a moment after the answer arrived
            await wait_for_gauge(client, "llmops_running_sequences", 0)


async def test_over_the_limit_is_refused_at_once_with_retry_after(v1: str, tmp_path: Path) -> None:
    async with serving(v1, tmp_path, max_running=1, max_waiting=1, max_new_tokens=4000) as (client, _):
        busy = [asyncio.create_task(client.post("/v1/completions", json=complete("long 0", 3000)))]
        await wait_for_gauge(client, "llmops_running_sequences", 1)
        busy.append(asyncio.create_task(client.post("/v1/completions", json=complete("long 1", 3000))))
        await wait_for_gauge(client, "llmops_waiting_sequences", 1)  # one decoding, one waiting: full
        refused = await asyncio.wait_for(client.post("/v1/completions", json=complete("one more", 3)), timeout=5)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["type"] == "overloaded"
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)


async def wait_for_gauge(client: httpx.AsyncClient, name: str, value: int) -> None:
    line = f'{name}{{model="{GENERATOR}",version="1"}} {float(value)}'
    for _ in range(200):
        if line in (await client.get("/metrics")).text:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{line} never showed")


async def switch_while_sending(
    store: str, one: Callable[[int], Awaitable[tuple[int, str]]], in_flight: int, tries: int
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Requests in flight, the champion moved to version 2, and more sent one by one until version 2 answers:
    every (status, fingerprint), and those sent after the switch."""
    first = [asyncio.create_task(one(i)) for i in range(in_flight)]
    await asyncio.sleep(0.05)
    set_alias(store, GENERATOR, "champion", "2")
    later = []
    for i in range(tries):  # keep sending while the new version loads and swaps in
        later.append(await one(100 + i))
        if later[-1][1].endswith("-v2"):
            break
        await asyncio.sleep(0.1)
    return [*await asyncio.gather(*first), *later], later


async def test_an_alias_switch_while_streaming_loses_no_request(store: str, tmp_path: Path) -> None:
    set_alias(store, GENERATOR, "champion", "1")
    async with serving(store, tmp_path) as (client, _):

        async def one(i: int) -> tuple[int, str]:
            response = await client.post("/v1/completions", json=complete(f"tweet {i}", 12))
            return response.status_code, response.json().get("system_fingerprint", "")

        results, later = await switch_while_sending(store, one, in_flight=8, tries=40)
    set_alias(store, GENERATOR, "champion", "1")
    assert all(status == 200 for status, _ in results)  # none lost, whichever version answered
    assert later[-1][1] == f"llmops-{GENERATOR}-v2"


async def readiness_with_a_reason(client: Any) -> dict:
    """`/readyz` once it gives a reason (a version failed to load), or as it stands after 30 s."""
    for _ in range(600):
        ready = (await client.get("/readyz")).json()
        if ready["reason"]:
            break
        await asyncio.sleep(0.05)
    return dict(ready)


async def test_a_generator_version_that_fails_to_load_leaves_the_old_one_serving(store: str, tmp_path: Path) -> None:
    set_alias(store, GENERATOR, "champion", "1")
    async with serving(store, tmp_path) as (client, _):
        set_alias(store, GENERATOR, "champion", "3")
        ready = await readiness_with_a_reason(client)
        answer = await client.post("/v1/completions", json=complete("still here?", 4))
        metrics = (await client.get("/metrics")).text
    set_alias(store, GENERATOR, "champion", "1")
    assert ready["ready"] is True
    assert ready["reason"].startswith(f"{GENERATOR}: version 3 failed to load")
    served = {m["name"]: m for m in ready["models"]}
    assert served[GENERATOR]["version"] == "1" and served[CLASSIFIER]["version"] == "1"
    assert answer.status_code == 200 and answer.json()["system_fingerprint"] == f"llmops-{GENERATOR}-v1"
    assert f'llmops_model_reload_error{{alias="champion",model="{GENERATOR}"}} 1.0' in metrics


# --- bad input is a 4xx ---------------------------------------------------------------------------------------


BAD = {
    "unknown-model": ({"model": "nope", "prompt": "x"}, 404, "not served here"),
    "a-classifier": ({"model": CLASSIFIER, "prompt": "x"}, 404, "is a sequence-classification model"),
    "no-prompt": ({"model": GENERATOR}, 422, "prompt"),
    "empty-prompt-list": ({"model": GENERATOR, "prompt": []}, 422, "at least one prompt"),
    "too-many-choices": ({"model": GENERATOR, "prompt": "x", "n": 9}, 422, "at most 8 (serve.max_n)"),
    "best-of": ({"model": GENERATOR, "prompt": "x", "n": 2, "best_of": 2}, 422, "best_of"),
    "hot": ({"model": GENERATOR, "prompt": "x", "temperature": 5}, 422, "temperature"),
    "too-many-logprobs": ({"model": GENERATOR, "prompt": "x", "logprobs": 21}, 422, "logprobs"),
    "token-outside-vocabulary": ({"model": GENERATOR, "prompt": [5, 10**7]}, 422, "prompt[1]: token id 10000000"),
    "negative-token": ({"model": GENERATOR, "prompt": [[5, -1]]}, 422, "prompt"),
    "five-stops": ({"model": GENERATOR, "prompt": "x", "stop": list("abcde")}, 422, "at most 4 stop strings"),
    "zero-tokens": ({"model": GENERATOR, "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    "long-prompt": ({"model": GENERATOR, "prompt": "word " * 400}, 413, "serve.max_prompt_tokens"),
    "prompt-not-text": ({"model": GENERATOR, "prompt": 7}, 422, "prompt"),
    "empty-stop": ({"model": GENERATOR, "prompt": "x", "stop": [""]}, 422, "stop"),
    "seed-over-64-bits": ({"model": GENERATOR, "prompt": "x", "seed": 2**64}, 422, "seed"),
}


@pytest.mark.parametrize("case", BAD)
async def test_bad_completion_requests_are_4xx(case: str, v1: str, tmp_path: Path) -> None:
    body, status, message = BAD[case]
    async with serving(v1, tmp_path) as (client, _):
        response = await client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"] and response.json()["request_id"]


async def test_bad_chat_and_generate_requests_are_4xx(v1: str, tmp_path: Path) -> None:
    async with serving(v1, tmp_path) as (client, _):
        no_messages = await client.post("/v1/chat/completions", json={"model": GENERATOR, "messages": []})
        bad_role = await client.post(
            "/v1/chat/completions", json={"model": GENERATOR, "messages": [{"role": "robot", "content": "x"}]}
        )
        not_json = await client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
        wrong_type = await client.post("/v1/completions", content=b"x", headers={"content-type": "text/plain"})
        no_text = await client.post(f"/v2/models/{GENERATOR}/generate", json={"parameters": {}})
        unknown = await client.post("/v2/models/nope/generate", json={"text_input": "x"})
        classifier_route = await client.post("/v1/predict", json={"texts": ["fine"]})
    assert [r.status_code for r in (no_messages, bad_role, not_json, wrong_type, no_text, unknown)] == [
        422, 422, 400, 415, 422, 404
    ]  # fmt: skip
    assert classifier_route.status_code == 200  # the classifier beside it keeps answering


async def test_api_keys_guard_the_new_routes(v1: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPS_API_KEYS", "k1")
    async with serving(v1, tmp_path) as (client, app):
        refused = await client.post("/v1/completions", json=complete("x", 2))
        listed = await client.get("/v1/models")
        keyed = openai.AsyncOpenAI(
            base_url="http://serving/v1",
            api_key="k1",
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serving"),
        )
        done = await keyed.completions.create(model=GENERATOR, prompt="x", max_tokens=2)
    assert refused.status_code == 401 and listed.status_code == 401 and done.choices


async def test_metrics_tell_time_to_first_token_and_tokens(v1: str, tmp_path: Path) -> None:
    async with serving(v1, tmp_path) as (client, _):
        await client.post("/v1/completions", json=complete("hello", 4))
        metrics = (await client.get("/metrics")).text
    labels = f'model="{GENERATOR}",version="1"'
    for name in (
        "llmops_time_to_first_token_seconds_count",
        "llmops_time_per_output_token_seconds_count",
        "llmops_generation_seconds_count",
        "llmops_prompt_tokens_total",
        "llmops_generated_tokens_total",
    ):
        assert f"{name}{{{labels}}}" in metrics, name


async def test_every_generation_is_logged_and_takes_feedback(v1: str, tmp_path: Path) -> None:
    from llmops.predlog import open_store

    chat = [{"role": "user", "content": "write a positive tweet about coachella"}]
    async with serving(v1, tmp_path) as (client, _):
        answered = await client.post(
            "/v1/chat/completions", json={"model": GENERATOR, "messages": chat, "max_tokens": 5}
        )
        request_id = answered.headers["x-request-id"]
        pair = await client.post("/v1/completions", json=complete(["first prompt", "second prompt"], 3))
        rated = await client.post("/v1/feedback", json={"request_id": request_id, "rating": 1, "completion": "so good"})
        second = await client.post(
            "/v1/feedback", json={"request_id": pair.headers["x-request-id"], "index": 1, "rating": -1}
        )
        unknown = await client.post("/v1/feedback", json={"request_id": "nope", "rating": 1})
        past_end = await client.post("/v1/feedback", json={"request_id": request_id, "index": 3, "rating": 1})
        both = await client.post("/v1/feedback", json={"request_id": request_id, "label": "positive", "rating": 1})
    assert (rated.status_code, second.status_code, unknown.status_code, past_end.status_code) == (202, 202, 404, 404)
    assert both.status_code == 422 and "a label is feedback on a classification" in both.json()["error"]
    store = open_store(tmp_path / "predictions.db")  # the service flushed its log on shutdown
    logged = store.read_generations()
    assert len(logged) == 3 and set(logged["model_name"]) == {GENERATOR}
    row = logged[logged["request_id"] == request_id].iloc[0]
    assert row["prompt"] == chat[0]["content"] and json.loads(row["messages"]) == chat
    assert row["completion"] == answered.json()["choices"][0]["message"]["content"]
    assert row["completion_tokens"] == answered.json()["usage"]["completion_tokens"] and row["route"] == "openai"
    assert row["ttft_ms"] > 0 and row["latency_ms"] >= row["ttft_ms"] and len(row["embedding"]) == 64 * 2
    assert sorted(logged.loc[logged["request_id"] == pair.headers["x-request-id"], "prompt"]) == [
        "first prompt",
        "second prompt",
    ]
    feedback = store.read_generation_feedback()
    assert feedback[["idx", "rating", "correction"]].values.tolist() == [[0, 1.0, "so good"], [1, -1.0, None]]
